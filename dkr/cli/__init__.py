"""The ``dkr`` command: entry point, sub-commands, rendering of events, the demo."""
