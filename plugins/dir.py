"""The ``dir`` backend: plain directories, on any file system.

Each layer is a full tree: a copy of its parent with the layer applied.
Between read-only layers the copy shares files by hardlink (layers never
change once sealed, and extraction replaces files instead of writing into
them); a machine gets a reflink copy where the file system can (btrfs, XFS),
else a real copy, so that writing in it can never reach a layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from dkr.hookspecs import hookimpl
from dkr.pluginkit import DirectoryEntries, DkrError, remove_tree, tied


def _cp(args: list[str], what: str) -> None:
    import subprocess     # here: every start of dkr and of its extractors' server loads this module
    # tied: a copy that outlived a killed dkr would go on writing into the tree
    # that the next run removes.
    proc = subprocess.run(tied(["cp", *args]), capture_output=True, text=True)
    if proc.returncode != 0:
        detail = proc.stderr.strip().splitlines()
        raise DkrError(f"{what} failed: {detail[-1] if detail else 'cp exited ' + str(proc.returncode)}")


class DirBackend(DirectoryEntries):
    name = "dir"
    layer_format = "stacked"
    auto_priority = 0

    def unusable_reason(self, image_root: Path) -> str | None:
        return None

    def create_layer(self, image_root: Path, key: str, path: Path, parent: Path | None) -> None:
        if parent is None:
            path.mkdir(mode=0o755)
        else:
            _cp(["-a", "--link", "--", str(parent), str(path)], f"linking layer {parent.name}")

    def seal_layer(self, image_root: Path, key: str, path: Path) -> None:
        pass

    def create_machine(self, image_root: Path, local: str, path: Path,
                       layers: Sequence[Path]) -> None:
        if not layers:
            path.mkdir(mode=0o755)
            return
        _cp(["-a", "--reflink=auto", "--", str(layers[-1]), str(path)],
            f"copying layer {layers[-1].name} to {path.name}")

    def activate_machine(self, image_root: Path, local: str, path: Path,
                         layers: Sequence[Path]) -> None:
        pass

    def deactivate_machine(self, image_root: Path, local: str, path: Path) -> None:
        pass

    def remove(self, path: Path) -> None:
        remove_tree(path)


@hookimpl
def dkr_storage_backends():
    return [DirBackend()]
