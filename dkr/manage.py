"""Machine management commands: list, inspect, remove, gc, mount, umount."""

from __future__ import annotations


def add_commands(sub, common) -> None:
    """Register the management subcommands on the ``dkr`` argument parser."""
