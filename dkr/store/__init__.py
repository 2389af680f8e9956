"""The image root on disk: names of layers and machines, records, locks."""
