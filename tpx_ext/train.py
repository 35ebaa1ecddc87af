"""`python -m tpx_ext.train`: the Dreamer trainer, `tpx_ext.dreamer.train`."""

if __name__ == "__main__":
    from .extras import needs

    with needs("dreamer"):
        from .dreamer.train import main

    main()
