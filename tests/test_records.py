"""Records, blobs and their temporary files in ``IMAGE_ROOT/.dkr``; removals that are
killed; gc beside pulls.

- A failed pull leaves no layer record without its tree.
- A kill (SIGKILL of dkr's whole process group) while a record, blob or tree is
  being written leaves temporary entries that the next pull and gc remove: the
  moment is found with inotify on the image root and its ``.dkr/`` folders.
- A kill during ``dkr remove`` leaves the whole machine or nothing that counts.
- Two processes at work on one image root never remove each other's live
  temporary entries.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import assert_clean_failure, assert_ok, pull, run_dkr, temp_entries
from reliability_helpers import (DkrProcess, backend_mount, chain_ids, check_layers_complete,
                                 visible_layers)

from dkr.testing import images
from dkr.testing.images import Dir, File, Hardlink, Image, Layer

BASE = Layer([Dir("base")] + [File(f"base/f{i}", b"%d\n" % i) for i in range(2000)])
BAD = {
    "hardlink-to-a-missing-name": Layer([Hardlink("h", "no/such/name")]),
    "member-outside-the-layer": Layer([Hardlink("h", "../" * 30 + "etc/passwd")]),
    "parent-not-a-directory": Layer([File("plain", b"x"), File("plain/child", b"y")]),
}
TOP = Layer([Dir("app"), File("app/data", random.Random(17).randbytes(300_000))])


@pytest.fixture(params=["dir", "btrfs", "overlay"])
def backend_root(request, image_root):
    with backend_mount(request.param) as mount:
        yield request.param, (mount / "machines" if mount else image_root)


@pytest.fixture(scope="module")
def pushed(registry):
    for name, bad in BAD.items():
        images.push_image(registry, f"records/{name}", "latest", Image([BASE, bad]))
    images.push_image(registry, "records/good", "latest", Image([BASE, TOP]))
    images.push_image(registry, "records/other", "latest",
                      Image([Layer([File("other", b"other\n")])]))
    return registry


def records_name_trees(root: Path) -> None:
    """Every layer record names a tree that exists."""
    layers = root / ".dkr" / "layers"
    for record in layers.glob("*.json") if layers.is_dir() else []:
        assert (root / f".dkr-{record.stem}").is_dir(), \
            f"{record.name} names a layer tree that does not exist"


# --- a failed pull ------------------------------------------------------------------------

@pytest.mark.parametrize("bad", sorted(BAD))
def test_a_refused_layer_leaves_no_record_of_a_missing_tree(pushed, backend_root, bad):
    backend, root = backend_root
    for attempt in range(3):          # the base is sealing when its child fails: a race
        run = pull(pushed, f"records/{bad}", root, "--backend", backend, local="m")
        assert_clean_failure(run, root, r"layer sha256:", local="m")
        records_name_trees(root)
        check_layers_complete(root)
    assert temp_entries(root) == []
