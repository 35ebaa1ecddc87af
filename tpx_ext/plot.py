"""`python -m tpx_ext.plot`: learning curves of Dreamer runs, `tpx_ext.dreamer.plot`."""

if __name__ == "__main__":
    from .extras import needs

    with needs("dreamer"):
        from .dreamer.plot import main

    main()
