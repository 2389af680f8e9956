"""A frozen dkr for benchmarking one git revision while the work tree moves.

The project's own venv has dkr installed in editable mode, so every `dkr pull`
runs whatever is on disk at that moment; a benchmark that takes 15 minutes
while someone commits measures several versions. `frozen_dkr(rev)` exports
that revision (`git archive`, committed code only) and installs it with its
dependencies into a venv of its own, once per revision, and returns the path
of its `dkr` executable.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def resolve(repo: Path, rev: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                          check=True, capture_output=True, text=True).stdout.strip()


def frozen_dkr(repo: Path, rev: str, cache: Path, log=print) -> tuple[str, str]:
    """(path of the dkr executable, full commit id) for `rev`."""
    commit = resolve(repo, rev)
    home = Path(cache) / "frozen" / commit[:12]
    exe = home / "venv" / "bin" / "dkr"
    if (home / "ok").exists() and exe.exists():
        return str(exe), commit
    log(f"installing dkr {commit[:12]} into {home} (once)")
    shutil.rmtree(home, ignore_errors=True)
    src = home / "src"
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(repo), "archive", commit], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    subprocess.run([sys.executable, "-m", "venv", str(home / "venv")], check=True)
    pip = [str(home / "venv" / "bin" / "python"), "-m", "pip", "-q",
           "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "--upgrade", "pip"], check=True)
    # (with btrfsutil, as install.sh installs dkr: not the `btrfs` command fallback)
    subprocess.run([*pip, "install", f"{src}[btrfs]"], check=True)
    (home / "ok").write_text(commit + "\n")
    return str(exe), commit
