"""`python -m tpx_ext.evaluate`: a saved Dreamer agent's return, GIF and open-loop video,
`tpx_ext.dreamer.evaluate`."""

if __name__ == "__main__":
    from .extras import needs

    with needs("dreamer"):
        from .dreamer.evaluate import main

    main()
