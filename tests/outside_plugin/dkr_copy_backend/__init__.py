"""An example dkr storage backend from outside dkr: every layer and machine a full copy.

It is the worked example of docs/plugins.md and what tests/test_outside_plugin.py
installs. Being a plain copy it works on any file system and needs no
privileges beyond writing the image root; it is slower and bigger than the
built-in backends, so ``--backend auto`` never picks it (``auto_priority``
below zero): users ask for it with ``--backend copy``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

from dkr.hookspecs import hookimpl
from dkr.pluginkit import DirectoryEntries, DkrError, tied


def _copy(source: Path, target: Path) -> None:
    # cp -a keeps what shutil.copytree loses: owners, device nodes, hardlinks, xattrs.
    # tied: the copy dies with dkr, and never writes on into a tree the next run removes.
    proc = subprocess.run(tied(["cp", "-a", "--", str(source), str(target)]),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise DkrError(f"copy backend: {lines[-1] if lines else 'cp failed'}")


class CopyBackend(DirectoryEntries):   # commits: one rename(2) each
    name = "copy"
    layer_format = "stacked"        # each layer holds all of its parents' files
    auto_priority = -1              # only on request

    def unusable_reason(self, image_root: Path) -> str | None:
        return None if shutil.which("cp") else "cp is not installed"

    def create_layer(self, image_root: Path, key: str, path: Path, parent: Path | None) -> None:
        if parent is None:
            path.mkdir(mode=0o755)
        else:
            _copy(parent, path)

    def seal_layer(self, image_root: Path, key: str, path: Path) -> None:
        pass                        # plain directories cannot be made read-only as a whole

    def create_machine(self, image_root: Path, local: str, path: Path,
                       layers: Sequence[Path]) -> None:
        if layers:
            _copy(layers[-1], path)
        else:
            path.mkdir(mode=0o755)

    def activate_machine(self, image_root: Path, local: str, path: Path,
                         layers: Sequence[Path]) -> None:
        pass                        # nothing to mount

    def deactivate_machine(self, image_root: Path, local: str, path: Path) -> None:
        pass

    def remove(self, path: Path) -> None:       # layers and machines alike
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()


@hookimpl
def dkr_storage_backends():
    return [CopyBackend()]
