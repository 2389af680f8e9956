"""Declarative, deterministic container images for tests, the demo and benchmarks.

A `Layer` is a list of entries (`File`, `Dir`, `Symlink`, `Hardlink`,
`Device`, `Fifo`, `Whiteout`, `Opaque`, or `Raw` for hand-made hostile
headers) written as a PAX tar with fixed owners and mtimes; nothing comes
from the host.  Entry paths are written exactly as given (no normalisation),
so tests can build ``../escape`` or ``/abs`` members on purpose.

An `Image` turns layers into a config blob and an OCI or Docker schema2
manifest; `push_image` / `push_index` put them into a `Registry`.
`random_tree_layer` / `random_image` write big layers straight to files for
the benchmarks.  Same inputs, same bytes, same digests (for the file-backed
generators: on the same machine, since pigz and zlib compress differently).
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import itertools
import json
import random
import shutil
import struct
import subprocess
import tarfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from .registry import file_digest

__all__ = [
    "File", "Dir", "Symlink", "Hardlink", "Device", "Fifo", "Whiteout", "Opaque", "Raw",
    "Layer", "LayerFile", "Image", "push_image", "push_index", "index_bytes",
    "parse_platform", "random_tree_layer", "random_image", "sample_image",
    "sample_expectations", "MTIME", "CREATED", "MEDIA_TYPES",
]

MTIME = 1700000000                    # 2023-11-14T22:13:20Z
CREATED = "2023-11-14T22:13:20Z"

MEDIA_TYPES = {
    ("oci", "manifest"): "application/vnd.oci.image.manifest.v1+json",
    ("oci", "index"): "application/vnd.oci.image.index.v1+json",
    ("oci", "config"): "application/vnd.oci.image.config.v1+json",
    ("oci", "none"): "application/vnd.oci.image.layer.v1.tar",
    ("oci", "gzip"): "application/vnd.oci.image.layer.v1.tar+gzip",
    ("oci", "zstd"): "application/vnd.oci.image.layer.v1.tar+zstd",
    ("docker", "manifest"): "application/vnd.docker.distribution.manifest.v2+json",
    ("docker", "index"): "application/vnd.docker.distribution.manifest.list.v2+json",
    ("docker", "config"): "application/vnd.docker.container.image.v1+json",
    ("docker", "none"): "application/vnd.docker.image.rootfs.diff.tar",
    ("docker", "gzip"): "application/vnd.docker.image.rootfs.diff.tar.gzip",
    # Docker schema2 has no zstd layer type; skopeo refuses to convert one.
}

COMPRESSIONS = ("gzip", "zstd", "none")
CHUNK = 1 << 20


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json(obj) -> bytes:
    # Sorted, compact JSON so equal inputs give equal digests.
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _check_format(format):
    if format not in ("oci", "docker"):
        raise ValueError(f"format must be 'oci' or 'docker', not {format!r}")


def layer_media_type(compression: str, format: str) -> str:
    _check_format(format)
    try:
        return MEDIA_TYPES[(format, compression)]
    except KeyError:
        raise ValueError(f"{format} manifests have no {compression} layer type") from None


# --------------------------------------------------------------------------
# tar entries


@dataclass(kw_only=True)
class _Entry:
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = MTIME
    xattrs: dict = field(default_factory=dict)
    uname: str = ""
    gname: str = ""

    def _info(self, name: str, type: bytes, **extra) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = type
        info.mode = self.mode
        info.uid, info.gid = self.uid, self.gid
        info.uname, info.gname = self.uname, self.gname
        info.mtime = self.mtime
        for k, v in extra.items():
            setattr(info, k, v)
        # Binary xattr values survive as surrogate escapes; tarfile then marks
        # the PAX header hdrcharset=BINARY and writes the raw bytes back.
        info.pax_headers = {
            "SCHILY.xattr." + k: (v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v)
            for k, v in sorted(self.xattrs.items())
        }
        return info

    def chunks(self):
        return ()


@dataclass
class File(_Entry):
    path: str
    data: bytes = b""

    def tarinfo(self):
        return self._info(self.path, tarfile.REGTYPE, size=len(self.data))

    def chunks(self):
        return (self.data,) if self.data else ()


@dataclass
class Dir(_Entry):
    path: str
    mode: int = field(default=0o755, kw_only=True)

    def tarinfo(self):
        return self._info(self.path, tarfile.DIRTYPE)


@dataclass
class Symlink(_Entry):
    """`path` -> `target` (written verbatim; may be absolute or dangling)."""
    path: str
    target: str
    mode: int = field(default=0o777, kw_only=True)

    def tarinfo(self):
        return self._info(self.path, tarfile.SYMTYPE, linkname=self.target)


@dataclass
class Hardlink(_Entry):
    """`path` becomes another name for the earlier member `target`."""
    path: str
    target: str

    def tarinfo(self):
        return self._info(self.path, tarfile.LNKTYPE, linkname=self.target)


@dataclass
class Device(_Entry):
    """A character ("c") or block ("b") device node."""
    path: str
    kind: str = "c"
    major: int = 0
    minor: int = 0
    mode: int = field(default=0o666, kw_only=True)

    def tarinfo(self):
        type = {"c": tarfile.CHRTYPE, "b": tarfile.BLKTYPE}[self.kind]
        return self._info(self.path, type, devmajor=self.major, devminor=self.minor)


@dataclass
class Fifo(_Entry):
    path: str

    def tarinfo(self):
        return self._info(self.path, tarfile.FIFOTYPE)


@dataclass
class Whiteout(_Entry):
    """Deletes `path` of lower layers: member ``dir/.wh.name``."""
    path: str

    def tarinfo(self):
        head, _, name = self.path.rstrip("/").rpartition("/")
        return self._info((head + "/" if head else "") + ".wh." + name, tarfile.REGTYPE)


@dataclass
class Opaque(_Entry):
    """Hides what lower layers had in directory `path`: member ``path/.wh..wh..opq``."""
    path: str

    def tarinfo(self):
        return self._info(self.path.rstrip("/") + "/.wh..wh..opq", tarfile.REGTYPE)


@dataclass
class Raw:
    """A hand-made header, for hostile archives; `info.size` must match `data`."""
    info: tarfile.TarInfo
    data: bytes = b""

    def tarinfo(self):
        return self.info

    def chunks(self):
        return (self.data,) if self.data else ()


class _TarWriter:
    """Writes PAX tar members to a binary stream (two zero blocks at the end,
    as Go's archive/tar does; no padding to a 10 KiB record)."""

    def __init__(self, out):
        self.out = out

    def add(self, info: tarfile.TarInfo, chunks=()):
        self.out.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        n = 0
        for chunk in chunks:
            self.out.write(chunk)
            n += len(chunk)
        if n != info.size:
            raise ValueError(f"{info.name}: header says {info.size} bytes, wrote {n}")
        if n % 512:
            self.out.write(bytes(512 - n % 512))

    def close(self):
        self.out.write(bytes(1024))


# --------------------------------------------------------------------------
# layers


def _compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if compression == "zstd":
        import zstandard
        return zstandard.ZstdCompressor(level=3).compress(data)
    if compression == "none":
        return data
    raise ValueError(f"unknown compression {compression!r}")


class Layer:
    """An in-memory layer.  `media_type` overrides the derived media type
    (e.g. to put a zstd layer into a Docker manifest on purpose)."""

    def __init__(self, entries, compression: str = "gzip", media_type: str | None = None,
                 comment: str | None = None):
        if compression not in COMPRESSIONS:
            raise ValueError(f"unknown compression {compression!r}")
        self.entries = list(entries)
        self.compression = compression
        self.media_type_override = media_type
        self.comment = comment

    def with_compression(self, compression: str) -> "Layer":
        return Layer(self.entries, compression, self.media_type_override, self.comment)

    @cached_property
    def tar(self) -> bytes:
        """The uncompressed tar (what the diff_id hashes)."""
        buf = io.BytesIO()
        writer = _TarWriter(buf)
        for entry in self.entries:
            writer.add(entry.tarinfo(), entry.chunks())
        writer.close()
        return buf.getvalue()

    @cached_property
    def blob(self) -> bytes:
        return _compress(self.tar, self.compression)

    @cached_property
    def diff_id(self) -> str:
        return _digest(self.tar)

    @cached_property
    def digest(self) -> str:
        return _digest(self.blob)

    @property
    def size(self) -> int:
        return len(self.blob)

    @property
    def source(self):
        """What `Registry.push_blob` takes: bytes here, a path for `LayerFile`."""
        return self.blob

    def media_type(self, format: str) -> str:
        return self.media_type_override or layer_media_type(self.compression, format)


@dataclass(frozen=True)
class LayerFile:
    """A layer blob on disk, as written by `random_tree_layer`."""
    path: Path
    digest: str
    diff_id: str
    size: int
    compression: str
    tar_size: int = 0
    n_files: int = 0
    comment: str | None = None
    media_type_override: str | None = None

    @property
    def source(self):
        return self.path

    def media_type(self, format: str) -> str:
        return self.media_type_override or layer_media_type(self.compression, format)


# --------------------------------------------------------------------------
# images


def parse_platform(platform) -> dict:
    """"os/arch[/variant]", (os, arch[, variant]) or a dict -> OCI platform dict."""
    if isinstance(platform, dict):
        return dict(platform)
    parts = platform.split("/") if isinstance(platform, str) else list(platform)
    if len(parts) not in (2, 3):
        raise ValueError(f"bad platform {platform!r}")
    out = {"os": parts[0], "architecture": parts[1]}
    if len(parts) == 3 and parts[2]:
        out["variant"] = parts[2]
    return out


DEFAULT_CONFIG = {
    "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
    "Cmd": ["/bin/sh"],
}


class Image:
    """Layers + runtime config -> config blob and manifest in `format` ("oci"|"docker").

    `config` is the runtime part (Env, Cmd, Entrypoint, WorkingDir, User, ...);
    the rest of the config blob (rootfs.diff_ids, history, platform) is derived.
    """

    def __init__(self, layers, config=None, os="linux", arch="amd64", variant=None,
                 format="oci", created=CREATED, annotations=None):
        _check_format(format)
        self.layers = list(layers)
        self.config = copy.deepcopy(DEFAULT_CONFIG if config is None else config)
        self.os, self.arch, self.variant = os, arch, variant
        self.format = format
        self.created = created
        self.annotations = annotations

    def _copy(self, **changes) -> "Image":
        kw = dict(layers=self.layers, config=self.config, os=self.os, arch=self.arch,
                  variant=self.variant, format=self.format, created=self.created,
                  annotations=self.annotations)
        kw.update(changes)
        return Image(**kw)

    def as_format(self, format: str) -> "Image":
        return self if format == self.format else self._copy(format=format)

    def with_platform(self, platform) -> "Image":
        p = parse_platform(platform)
        if (p["os"], p["architecture"], p.get("variant")) == (self.os, self.arch, self.variant):
            return self
        return self._copy(os=p["os"], arch=p["architecture"], variant=p.get("variant"))

    @property
    def platform(self) -> dict:
        p = {"architecture": self.arch, "os": self.os}
        if self.variant:
            p["variant"] = self.variant
        return p

    @cached_property
    def config_json(self) -> dict:
        cfg = {
            "created": self.created,
            "architecture": self.arch,
            "os": self.os,
            "config": self.config,
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in self.layers]},
            "history": [
                {"created": self.created,
                 "created_by": getattr(layer, "comment", None) or f"dkr.testing layer {i}"}
                for i, layer in enumerate(self.layers)
            ],
        }
        if self.variant:
            cfg["variant"] = self.variant
        return cfg

    @cached_property
    def config_bytes(self) -> bytes:
        return _json(self.config_json)

    @property
    def config_digest(self) -> str:
        return _digest(self.config_bytes)

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[(self.format, "manifest")]

    @cached_property
    def manifest_json(self) -> dict:
        manifest = {
            "schemaVersion": 2,
            "mediaType": self.media_type,
            "config": {"mediaType": MEDIA_TYPES[(self.format, "config")],
                       "digest": self.config_digest, "size": len(self.config_bytes)},
            "layers": [{"mediaType": layer.media_type(self.format), "digest": layer.digest,
                        "size": layer.size} for layer in self.layers],
        }
        if self.annotations and self.format == "oci":
            manifest["annotations"] = self.annotations
        return manifest

    @cached_property
    def manifest_bytes(self) -> bytes:
        return _json(self.manifest_json)

    @property
    def manifest_digest(self) -> str:
        return _digest(self.manifest_bytes)

    def descriptor(self, platform=None) -> dict:
        """This image's manifest as an index entry."""
        return {"mediaType": self.media_type, "digest": self.manifest_digest,
                "size": len(self.manifest_bytes),
                "platform": parse_platform(platform) if platform else self.platform}


def push_image(registry, repo: str, tag: str | None, image: Image) -> str:
    """Push layers, config and manifest (under `tag`, or by digest if None);
    returns the manifest digest."""
    for layer in image.layers:
        registry.push_blob(repo, layer.source, digest=layer.digest)
    registry.push_blob(repo, image.config_bytes, digest=image.config_digest)
    return registry.push_manifest(repo, tag or image.manifest_digest, image.manifest_bytes,
                                  image.media_type)


def _platform_pairs(images):
    items = images.items() if hasattr(images, "items") else images
    return [(parse_platform(p), img) for p, img in items]


def index_bytes(images, format: str = "oci", annotations=None):
    """(body, media_type) of an OCI index / Docker manifest list over
    {platform: Image} (or (platform, Image) pairs).  Each image is taken in
    `format` and with the platform it is listed under."""
    _check_format(format)
    manifests = [img.as_format(format).with_platform(p).descriptor()
                 for p, img in _platform_pairs(images)]
    index = {"schemaVersion": 2, "mediaType": MEDIA_TYPES[(format, "index")],
             "manifests": manifests}
    if annotations and format == "oci":
        index["annotations"] = annotations
    return _json(index), MEDIA_TYPES[(format, "index")]


def push_index(registry, repo: str, tag: str, images, format: str = "oci") -> str:
    """Push every platform's image by digest, then the index under `tag`;
    returns the index digest.  `images`: {"linux/arm64/v8": Image, ...}."""
    for platform, img in _platform_pairs(images):
        push_image(registry, repo, None, img.as_format(format).with_platform(platform))
    body, media_type = index_bytes(images, format)
    return registry.push_manifest(repo, tag, body, media_type)


# --------------------------------------------------------------------------
# big generated layers


_SYLLABLES = ["an", "ber", "con", "da", "el", "fi", "gor", "ha", "in", "jo", "ka", "lu",
              "mo", "nor", "op", "pre", "qu", "ri", "sta", "tu", "ul", "ve", "wa", "xi",
              "yo", "ze", "th", "sch", "ion", "ent"]


class _Pools:
    """Seeded byte pools that file contents are sliced from.

    Slicing keeps generation at memory speed; pools larger than gzip's 32 KiB
    window (and mostly larger than zstd's default window) keep the repeats
    from making the data unrealistically compressible.  Three kinds:
    text/code-like (~3:1 with gzip), binary-like (skewed byte histogram,
    ~2:1), and random (incompressible, like already-compressed assets).
    """

    def __init__(self, rng: random.Random, size: int):
        self.vocab = ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 4))) for _ in range(3000)]
        self.text = self._text(rng, size)
        self.binary = self._binary(rng, size)
        self.random = rng.randbytes(2 * size)

    def _text(self, rng, size):
        weights = list(itertools.accumulate(1.0 / (i + 1) for i in range(len(self.vocab))))
        lines = []
        for _ in range(4000):
            words = rng.choices(self.vocab, cum_weights=weights, k=rng.randint(2, 14))
            style = rng.random()
            if style < 0.3:
                line = "    " * rng.randint(0, 3) + f"{words[0]} = {'_'.join(words[1:3])}({', '.join(words[3:])})"
            elif style < 0.4:
                line = "# " + " ".join(words)
            else:
                line = " ".join(words).capitalize() + "."
            lines.append(line + "\n")
        out = "".join(rng.choices(lines, k=max(1, size // 40)))
        return out.encode()[:size] or b"\n"

    def _binary(self, rng, size):
        # Map uniform random bytes onto a skewed histogram (lots of 0x00 and
        # 0xff, a few dozen common values), roughly like machine code.
        common = rng.randbytes(48)
        table = bytes([0] * 96 + [0xFF] * 24 + [common[i % 48] for i in range(96)]
                      + list(range(40)))
        return rng.randbytes(size).translate(table)


def _file_chunks(rng: random.Random, pools: _Pools, kind: str, size: int):
    """Contents of one file as memoryview slices of a pool."""
    pool = memoryview(getattr(pools, kind))
    left = size
    while left:
        n = min(left, rng.randint(4096, 65536), len(pool))
        start = rng.randrange(0, len(pool) - n + 1)
        yield pool[start:start + n]
        left -= n


class _HashSink:
    """Write-through that hashes and counts the uncompressed tar stream."""

    def __init__(self, out):
        self.out = out
        self.sha = hashlib.sha256()
        self.count = 0

    def write(self, data):
        self.sha.update(data)
        self.out.write(data)
        self.count += len(data)


def _compressor(compression: str, out_file, level=None):
    """(writable, finish) compressing into the open binary `out_file`."""
    if compression == "none":
        return out_file, lambda: None
    if compression == "zstd":
        import zstandard
        # Single-threaded on purpose: same bytes on every machine.
        writer = zstandard.ZstdCompressor(level=level or 3).stream_writer(
            out_file, closefd=False)
        return writer, writer.close
    if compression == "gzip":
        pigz = shutil.which("pigz")
        if pigz:
            # pigz output does not depend on the thread count; -n drops name/mtime.
            proc = subprocess.Popen([pigz, f"-{level or 6}", "-n", "-c"], stdin=subprocess.PIPE,
                                    stdout=out_file, bufsize=CHUNK)

            def finish():
                proc.stdin.close()
                if proc.wait() != 0:
                    raise RuntimeError("pigz failed")
            return proc.stdin, finish
        writer = gzip.GzipFile(fileobj=out_file, mode="wb", compresslevel=level or 6, mtime=0)
        return writer, writer.close
    raise ValueError(f"unknown compression {compression!r}")


def _tree_plan(rng: random.Random, vocab, n_files: int, total_bytes: int, prefix: str):
    """Directories and (path, size, kind, mode) for a plausible file tree."""
    n_dirs = max(1, n_files // 16)
    parts = [p for p in prefix.split("/") if p]
    dirs = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)] or [""]
    for i in range(n_dirs):
        parent = rng.choice(dirs[-8:] + dirs[:4])     # bias toward some depth
        dirs.append(f"{parent}/{rng.choice(vocab)}{i}".lstrip("/"))
    # Log-normal sizes: many small files, a few big ones, like real images.
    weights = [rng.lognormvariate(0, 1.6) for _ in range(n_files)]
    scale = total_bytes / (sum(weights) or 1)
    sizes = [int(w * scale) for w in weights]
    if sizes:
        sizes[rng.randrange(n_files)] += total_bytes - sum(sizes)
    files = []
    for i, size in enumerate(sizes):
        kind = rng.choices(("text", "binary", "random"), weights=(50, 40, 10))[0]
        ext = {"text": rng.choice((".txt", ".py", ".conf", ".h")),
               "binary": rng.choice((".so", "", ".o")), "random": rng.choice((".gz", ".png"))}[kind]
        name = f"{rng.choice(dirs)}/{rng.choice(vocab)}-{i}{ext}".lstrip("/")
        mode = 0o755 if kind == "binary" and not ext else 0o644
        files.append((name, size, kind, mode))
    return [d for d in dirs if d], files


def random_tree_layer(seed, n_files: int, total_bytes: int, path, compression: str = "gzip",
                      prefix: str = "", symlinks: bool = True, pool_size: int = 4 << 20,
                      level: int | None = None) -> LayerFile:
    """Write a deterministic layer of `n_files` files holding `total_bytes`
    bytes (uncompressed contents) to `path`, streaming: never the whole tar
    in memory.  gzip goes through pigz when installed, else Python's zlib.

    `level` is the compression level (default gzip 6, zstd 3).  This data
    gzips at ~10 MB/s per core at level 6 and ~35 MB/s at level 1 (similar
    ratio), so big benchmark sets may want level=1.  Expect about 1:2 with
    gzip and 1:2.8 with zstd."""
    rng = random.Random(f"dkr-tree/{seed}")
    pools = _Pools(rng, max(64 << 10, min(pool_size, total_bytes)))
    dirs, files = _tree_plan(rng, pools.vocab, n_files, total_bytes, prefix)
    entries = [("d", d, 0, None, 0o755) for d in dirs]
    entries += [("f", name, size, kind, mode) for name, size, kind, mode in files]
    if symlinks and files:
        for i in range(max(1, n_files // 100)):
            target = rng.choice(files)[0]
            entries.append(("l", f"{target}.link{i}", 0, target.rsplit("/", 1)[-1], 0o777))
    entries.sort(key=lambda e: e[1])

    path = Path(path)
    with open(path, "wb") as out:
        stream, finish = _compressor(compression, out, level)
        sink = _HashSink(stream)
        writer = _TarWriter(sink)
        for kind, name, size, extra, mode in entries:
            if kind == "d":
                writer.add(Dir(name, mode=mode).tarinfo())
            elif kind == "l":
                writer.add(Symlink(name, extra).tarinfo())
            else:
                writer.add(_sized_info(name, size, mode), _file_chunks(rng, pools, extra, size))
        writer.close()
        finish()
    digest = file_digest(path)
    return LayerFile(path=path, digest=digest, diff_id="sha256:" + sink.sha.hexdigest(),
                     size=path.stat().st_size, compression=compression, tar_size=sink.count,
                     n_files=n_files, comment=f"random_tree_layer seed={seed}")


def _sized_info(name, size, mode):
    info = File(name, mode=mode).tarinfo()
    info.size = size
    return info


def random_image(seed, directory, layers=((2000, 64 << 20),), compression: str = "gzip",
                 format: str = "oci", level: int | None = None, **image_kw) -> Image:
    """An image of generated layers, one (n_files, total_bytes) per layer,
    written under `directory` (reused when already there: a benchmark can
    call this again cheaply)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ext = {"gzip": ".tar.gz", "zstd": ".tar.zst", "none": ".tar"}[compression]
    out = []
    for i, (n_files, total) in enumerate(layers):
        path = directory / f"layer-{seed}-{i}-{n_files}-{total}-{level or 'd'}{ext}"
        meta = path.with_name(path.name + ".json")
        if path.exists() and meta.exists():
            info = json.loads(meta.read_text())
            out.append(LayerFile(path=path, **info))
            continue
        layer = random_tree_layer(f"{seed}/{i}", n_files, total, path, compression,
                                  prefix=f"layer{i}/", level=level)
        # Written last: its presence says the layer file is complete.
        meta.write_text(json.dumps({k: v for k, v in layer.__dict__.items() if k != "path"}))
        out.append(layer)
    return Image(out, format=format, **image_kw)


# --------------------------------------------------------------------------
# the sample image


def _caps(*bits) -> bytes:
    """A VFS_CAP_REVISION_2 security.capability value with `bits` permitted+effective."""
    permitted = sum(1 << b for b in bits)
    return struct.pack("<IIIII", 0x02000001, permitted & 0xFFFFFFFF, 0, permitted >> 32, 0)


CAP_NET_RAW = 13
LONG_DIR = "opt/app/" + "/".join(["deeply-nested-directory"] * 5)


def sample_image(format: str = "oci", arch: str = "amd64", variant=None) -> Image:
    """A small image that exercises every tar feature a puller must handle.

    Layer 1 (gzip): a base tree with dirs, owners, setuid/setgid, sticky /tmp,
    relative and absolute symlinks, a hardlink group, char/block devices, a
    fifo, user.* and security.capability xattrs.
    Layer 2 (zstd; gzip in Docker format, which has no zstd): whiteout of
    etc/old.conf, opaque var/cache/apt with a new file in it, an overwrite,
    a new xattr'd file and hardlink.
    Layer 3 (uncompressed): whiteout of a whole directory, a file replaced by
    a directory, absolute symlinks, a non-ASCII name and a >100-byte path
    (PAX headers).
    """
    busybox = bytes(range(256)) * 16
    base = Layer([
        Symlink("bin", "usr/bin"),
        Dir("dev"),
        Device("dev/null", "c", 1, 3, mode=0o666),
        Device("dev/loop0", "b", 7, 0, mode=0o660, gid=6),
        Dir("etc"),
        File("etc/hostname", b"sample\n"),
        File("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"),
        File("etc/old.conf", b"removed by layer 2\n"),
        File("etc/xattrs", b"has xattrs\n", xattrs={"user.comment": b"hello", "user.binary": b"\x00\x01\xfe\xff"}),
        Symlink("etc/os-release", "../usr/lib/os-release"),
        Symlink("etc/mtab", "/proc/self/mounts"),
        Dir("home"),
        Dir("home/user", mode=0o750, uid=1000, gid=1000),
        File("home/user/.profile", b"export PS1='$ '\n", mode=0o600, uid=1000, gid=1000),
        Symlink("lib", "/usr/lib"),
        Dir("run"),
        Fifo("run/initctl", mode=0o600),
        Dir("srv"),
        File("srv/data", b"a file that layer 3 turns into a directory\n"),
        Dir("tmp", mode=0o1777),
        Dir("usr"),
        Dir("usr/bin"),
        File("usr/bin/busybox", busybox, mode=0o755),
        Hardlink("usr/bin/sh", "usr/bin/busybox"),
        Hardlink("usr/bin/ls", "usr/bin/busybox"),
        File("usr/bin/su", b"#!/bin/sh\necho su\n", mode=0o4755),
        File("usr/bin/wall", b"#!/bin/sh\necho wall\n", mode=0o2755, gid=5),
        File("usr/bin/ping", b"#!/bin/sh\necho ping\n", mode=0o755,
             xattrs={"security.capability": _caps(CAP_NET_RAW)}),
        Dir("usr/lib"),
        File("usr/lib/os-release", b'ID=sample\nPRETTY_NAME="dkr sample"\n'),
        Dir("usr/share"),
        Dir("usr/share/doc"),
        Dir("usr/share/doc/pkg"),
        File("usr/share/doc/pkg/README", b"docs removed by layer 3\n"),
        File("usr/share/doc/pkg/copyright", b"(c) nobody\n"),
        Dir("var"),
        Dir("var/cache"),
        Dir("var/cache/apt"),
        File("var/cache/apt/pkgcache.bin", b"\x00old cache\x00" * 100),
        Dir("var/cache/apt/archives"),
        File("var/cache/apt/archives/lock", b""),
    ], compression="gzip", comment="base")

    update = Layer([
        Dir("etc"),
        Whiteout("etc/old.conf"),
        File("etc/hostname", b"updated\n"),
        Dir("usr/bin"),
        File("usr/bin/tool", b"#!/bin/sh\necho tool\n", mode=0o755, xattrs={"user.origin": b"layer2"}),
        Hardlink("usr/bin/tool-alias", "usr/bin/tool"),
        Dir("var/cache/apt"),
        Opaque("var/cache/apt"),
        File("var/cache/apt/fresh.bin", b"new cache\n"),
    ], compression="zstd" if format == "oci" else "gzip", comment="update")

    app = Layer([
        Dir("usr/share"),
        Whiteout("usr/share/doc"),
        Dir("srv/data", mode=0o750),
        File("srv/data/file.txt", b"a directory now\n"),
        Dir("opt"),
        Dir("opt/app"),
        File("opt/app/run.sh", b"#!/bin/sh\nexec /usr/bin/tool\n", mode=0o755),
        Symlink("opt/app/current", "/opt/app"),
        Symlink("opt/app/hostname", "/etc/hostname"),
        Dir("opt/app/données"),
        File("opt/app/données/übung.txt", "non-ASCII name\n".encode()),
        *[Dir("/".join(LONG_DIR.split("/")[:i])) for i in range(3, LONG_DIR.count("/") + 2)],
        File(LONG_DIR + "/long-path-needs-pax.txt", b"deep\n"),
    ], compression="none", comment="app")

    return Image([base, update, app],
                 config={"Env": DEFAULT_CONFIG["Env"], "Cmd": ["/opt/app/run.sh"],
                         "WorkingDir": "/opt/app", "User": "0:0"},
                 arch=arch, variant=variant, format=format)


def sample_expectations() -> dict:
    """What a correct unpack of `sample_image()` looks like, for any puller's tests.

    present: path -> dict of expected attributes (type, mode, uid, gid,
    content, target, rdev, xattrs) — only the ones that matter;
    absent: paths that must not exist; hardlinks: groups of paths sharing an inode.
    """
    return {
        "present": {
            "bin": {"type": "symlink", "target": "usr/bin"},
            "lib": {"type": "symlink", "target": "/usr/lib"},
            "etc/mtab": {"type": "symlink", "target": "/proc/self/mounts"},
            "dev/null": {"type": "chr", "rdev": (1, 3), "mode": 0o666},
            "dev/loop0": {"type": "blk", "rdev": (7, 0), "mode": 0o660, "gid": 6},
            "run/initctl": {"type": "fifo", "mode": 0o600},
            "tmp": {"type": "dir", "mode": 0o1777},
            "home/user": {"type": "dir", "mode": 0o750, "uid": 1000, "gid": 1000},
            "home/user/.profile": {"type": "file", "mode": 0o600, "uid": 1000, "gid": 1000},
            "etc/hostname": {"type": "file", "content": b"updated\n"},
            "etc/xattrs": {"type": "file", "xattrs": {"user.comment": b"hello",
                                                      "user.binary": b"\x00\x01\xfe\xff"}},
            "usr/bin/su": {"type": "file", "mode": 0o4755},
            "usr/bin/wall": {"type": "file", "mode": 0o2755, "gid": 5},
            "usr/bin/ping": {"type": "file", "xattrs": {"security.capability": _caps(CAP_NET_RAW)}},
            "usr/bin/tool": {"type": "file", "mode": 0o755, "xattrs": {"user.origin": b"layer2"}},
            "usr/share": {"type": "dir"},
            "var/cache/apt": {"type": "dir"},
            "var/cache/apt/fresh.bin": {"type": "file", "content": b"new cache\n"},
            "srv/data": {"type": "dir", "mode": 0o750},
            "srv/data/file.txt": {"type": "file", "content": b"a directory now\n"},
            "opt/app/current": {"type": "symlink", "target": "/opt/app"},
            "opt/app/hostname": {"type": "symlink", "target": "/etc/hostname"},
            "opt/app/données/übung.txt": {"type": "file", "content": "non-ASCII name\n".encode()},
            LONG_DIR + "/long-path-needs-pax.txt": {"type": "file", "content": b"deep\n"},
        },
        "absent": [
            "etc/old.conf", "etc/.wh.old.conf", "usr/share/doc", "usr/share/.wh.doc",
            "var/cache/apt/pkgcache.bin", "var/cache/apt/archives",
            "var/cache/apt/.wh..wh..opq",
        ],
        "hardlinks": [
            ["usr/bin/busybox", "usr/bin/ls", "usr/bin/sh"],
            ["usr/bin/tool", "usr/bin/tool-alias"],
        ],
    }
