"""The correctness oracle: what a root file system looks like, and what
``skopeo copy`` + ``umoci unpack`` make of an image.

`tree_snapshot` describes a tree without following symlinks; two pullers
agree when their snapshots are equal (`diff_trees` says where they are not).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

__all__ = ["Entry", "tree_snapshot", "diff_trees", "hardlink_groups", "check_expectations",
           "umoci_unpack", "OracleError"]

IGNORED_XATTRS = frozenset({"security.selinux"})


class OracleError(RuntimeError):
    pass


class Entry(NamedTuple):
    """One path of a snapshot.

    type:     "file" | "dir" | "symlink" | "chr" | "blk" | "fifo" | "socket"
    mode:     permission bits incl. setuid/setgid/sticky (stat.S_IMODE)
    size:     bytes for regular files, else None (directory sizes are fs noise)
    content:  sha256 hex for files, link target for symlinks, (major, minor)
              for devices, else None
    xattrs:   sorted ((name, value), ...), security.selinux left out
    link:     for a hard-linked file, the smallest path of its group; else None
    mtime:    integer seconds, or None unless asked for
    """
    type: str
    mode: int
    uid: int
    gid: int
    size: int | None
    content: object
    xattrs: tuple
    link: str | None
    mtime: int | None


def _type(st) -> str:
    m = st.st_mode
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISCHR, "chr"), (stat.S_ISBLK, "blk"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISSOCK, "socket")):
        if test(m):
            return name
    return "unknown"


def _sha256(path) -> str:
    h = hashlib.sha256()
    # O_NOFOLLOW: a racing swap to a symlink must not make us read elsewhere.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _xattrs(path) -> tuple:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for name in sorted(names):
        if name in IGNORED_XATTRS:
            continue
        try:
            out.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError:
            continue
    return tuple(out)


def tree_snapshot(root, mtimes: bool = False, include_root: bool = True) -> dict:
    """{relative path: Entry} for everything under `root`, symlinks not followed.

    The root itself is "." (left out with include_root=False).  Hard links
    are recorded as groups of paths within the tree, not inode numbers, so
    snapshots of different trees compare equal when their link structure does.
    """
    root = Path(root)
    raw = {}
    inodes: dict[tuple, list[str]] = {}

    def visit(rel: str, full: str):
        st = os.lstat(full)
        raw[rel] = (full, st)
        if not stat.S_ISDIR(st.st_mode):
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)

    visit(".", str(root))
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        reldir = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            rel = name if reldir == "." else f"{reldir}/{name}"
            visit(rel, os.path.join(dirpath, name))

    group_of = {}
    for paths in inodes.values():
        if len(paths) > 1:
            leader = min(paths)
            for p in paths:
                group_of[p] = leader

    snap = {}
    for rel, (full, st) in raw.items():
        if rel == "." and not include_root:
            continue
        kind = _type(st)
        content = None
        if kind == "file":
            content = _sha256(full)
        elif kind == "symlink":
            content = os.readlink(full)
        elif kind in ("chr", "blk"):
            content = (os.major(st.st_rdev), os.minor(st.st_rdev))
        snap[rel] = Entry(
            type=kind, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
            size=st.st_size if kind == "file" else None, content=content,
            xattrs=_xattrs(full), link=group_of.get(rel),
            mtime=int(st.st_mtime) if mtimes else None)
    return dict(sorted(snap.items()))


def hardlink_groups(snapshot: dict) -> list[list[str]]:
    """The hard-link groups of a snapshot, each sorted, as a sorted list."""
    groups: dict[str, list[str]] = {}
    for path, entry in snapshot.items():
        if entry.link:
            groups.setdefault(entry.link, []).append(path)
    return sorted(sorted(g) for g in groups.values())


def _fmt(field, value):
    if field == "mode":
        return oct(value)
    if field == "xattrs":
        return "{" + ", ".join(f"{k}={v!r}" for k, v in value) + "}"
    return repr(value)


def diff_trees(a: dict, b: dict, a_name: str = "a", b_name: str = "b") -> list[str]:
    """Human-readable differences between two snapshots (empty when equal)."""
    out = []
    for path in sorted(a.keys() | b.keys()):
        if path not in b:
            out.append(f"only in {a_name}: {path} ({a[path].type})")
        elif path not in a:
            out.append(f"only in {b_name}: {path} ({b[path].type})")
        else:
            ea, eb = a[path], b[path]
            for field in Entry._fields:
                va, vb = getattr(ea, field), getattr(eb, field)
                if va != vb:
                    out.append(f"{path}: {field} {_fmt(field, va)} ({a_name}) != "
                               f"{_fmt(field, vb)} ({b_name})")
    return out


def check_expectations(snapshot: dict, expectations: dict) -> list[str]:
    """Where `snapshot` breaks `expectations` (as `images.sample_expectations()`
    returns them); empty when it holds.  File "content" is compared as bytes."""
    problems = []
    for path, want in expectations.get("present", {}).items():
        entry = snapshot.get(path)
        if entry is None:
            problems.append(f"missing: {path}")
            continue
        for key, value in want.items():
            if key == "content":
                got, value = entry.content, hashlib.sha256(value).hexdigest()
            elif key == "target":
                got = entry.content
            elif key == "rdev":
                got, value = entry.content, tuple(value)
            elif key == "xattrs":
                got, value = dict(entry.xattrs), dict(value)
            else:
                got = getattr(entry, key)
            if got != value:
                problems.append(f"{path}: {key} is {_fmt(key, got) if key != 'xattrs' else got!r}, "
                                f"want {_fmt(key, value) if key != 'xattrs' else value!r}")
    for path in expectations.get("absent", []):
        if path in snapshot:
            problems.append(f"should not exist: {path}")
    groups = hardlink_groups(snapshot)
    for group in expectations.get("hardlinks", []):
        if sorted(group) not in groups:
            problems.append(f"not one hardlink group: {sorted(group)} (groups: {groups})")
    return problems


# --------------------------------------------------------------------------
# skopeo + umoci


def _host_of(registry) -> str:
    """'127.0.0.1:5000' from a Registry, a URL or a bare host."""
    if hasattr(registry, "host"):
        return registry.host
    text = str(registry)
    if "://" in text:
        text = text.split("://", 1)[1]
    return text.rstrip("/")


def _run(cmd):
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        raise OracleError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.strip()}")
    return proc


def _has_zstd_layers(layout: Path) -> bool:
    index = json.loads((layout / "index.json").read_text())
    for desc in index["manifests"]:
        algo, _, hexdigest = desc["digest"].partition(":")
        manifest = json.loads((layout / "blobs" / algo / hexdigest).read_text())
        if any(layer["mediaType"].endswith("+zstd") for layer in manifest.get("layers", [])):
            return True
    return False


def umoci_unpack(registry, repo: str, ref: str, dest, insecure: bool = True, platform=None,
                 credentials=None, ca_file=None) -> Path:
    """Pull REPO:REF (or REPO@sha256:...) with skopeo into an OCI layout under
    `dest`, unpack it with umoci and return the rootfs path (DEST/bundle/rootfs).

    registry:    a `Registry`, "http://127.0.0.1:PORT" or "127.0.0.1:PORT".
    platform:    "os/arch[/variant]" or a dict, to choose from an index.
    credentials: (user, password); taken from a `Registry` when not given.
    ca_file:     trust this CA (instead of insecure=True) for https registries.
    umoci resolves whiteouts, so the rootfs is the final tree.
    """
    for tool in ("skopeo", "umoci"):
        if shutil.which(tool) is None:
            raise OracleError(f"{tool} not found")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    layout, bundle = dest / "oci", dest / "bundle"
    if credentials is None:
        credentials = getattr(registry, "push_credentials", None)
    if ca_file is None:
        ca_file = getattr(registry, "ca_file", None)
    sep = "@" if ref.startswith("sha256:") else ":"
    src = f"docker://{_host_of(registry)}/{repo}{sep}{ref}"

    with tempfile.TemporaryDirectory(prefix="dkr-oracle-") as tmp:
        # Our own policy and auth file keep the host's configuration out.
        policy = Path(tmp) / "policy.json"
        policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        cmd = ["skopeo", "--policy", str(policy)]
        if platform:
            from .images import parse_platform
            p = parse_platform(platform)
            cmd += ["--override-os", p["os"], "--override-arch", p["architecture"]]
            if p.get("variant"):
                cmd += ["--override-variant", p["variant"]]
        cmd += ["copy", "--authfile", str(Path(tmp) / "auth.json")]
        if ca_file and not insecure:
            certs = Path(tmp) / "certs"
            certs.mkdir()
            shutil.copy(ca_file, certs / "ca.crt")
            cmd += ["--src-cert-dir", str(certs)]
        else:
            cmd += ["--src-tls-verify=false"]
        if credentials:
            cmd += ["--src-creds", f"{credentials[0]}:{credentials[1]}"]
        cmd += [src, f"oci:{layout}:img"]
        _run(cmd)
        if _has_zstd_layers(layout):
            # umoci 0.4.7 rejects zstd layers ("blob is not correct mediatype");
            # let skopeo recompress them (diff_ids, hence the config, stay the same).
            gz_layout = dest / "oci-gzip"
            _run(["skopeo", "--policy", str(policy), "copy", "--dest-compress",
                  "--dest-compress-format", "gzip", f"oci:{layout}:img", f"oci:{gz_layout}:img"])
            layout = gz_layout
    if bundle.exists():
        shutil.rmtree(bundle)
    _run(["umoci", "unpack", "--image", f"{layout}:img", str(bundle)])
    return bundle / "rootfs"
