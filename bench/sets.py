"""The benchmark's image sets: deterministic, generated once, cached on disk.

small  3 layers, ~33 MB gz, ~5.4k files
large  8 layers, ~484 MB gz, ~1.08 GB tar, ~42k files; the 8th layer deletes
       files and whole directories of lower layers (``.wh.`` whiteouts) and
       makes some directories opaque (``.wh..wh..opq``) with new files in them
batch  10 images that share a 2-layer base, each with its own top layer;
       ~165 MB gz of unique blobs

`--scale` multiplies every layer's file count and byte count (the shape stays
the same).  Layers are written by `dkr.testing.images.random_tree_layer`
(gzip level 6 through pigz, as `docker push` would compress) into a cache
directory and reused on the next run; the same seed and scale give the same
bytes on the same machine.
"""

from __future__ import annotations

import json
import random
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from dkr.testing.images import Dir, File, Image, Layer, LayerFile, Opaque, Whiteout, \
    push_image, random_tree_layer

MB = 1_000_000

# (n_files, tar bytes of contents) per layer at scale 1
SMALL = [(3200, 42 * MB), (1500, 20 * MB), (700, 9 * MB)]
LARGE = [(12000, 330 * MB), (9000, 250 * MB), (7000, 180 * MB), (5000, 130 * MB),
         (4000, 90 * MB), (3000, 60 * MB), (1500, 30 * MB)]
LARGE_TOP = (500, 10 * MB)          # the whiteout layer's own new files
BATCH_BASE = [(3000, 60 * MB), (1500, 30 * MB)]
BATCH_TOP = (600, 26 * MB)
BATCH_IMAGES = 10
LEVEL = 6


@dataclass
class BlobInfo:
    digest: str
    size: int           # compressed bytes
    tar_size: int
    repo: str           # a repository that serves it


@dataclass
class BenchImage:
    name: str           # machine name
    repo: str
    tag: str
    image: Image

    def ref(self, host: str) -> str:
        return f"{host}/{self.repo}:{self.tag}"

    @property
    def layers(self) -> list:
        return self.image.layers


@dataclass
class BenchSet:
    name: str
    images: list[BenchImage]
    description: str = ""
    subsets: dict = field(default_factory=dict)   # label -> BenchSet (scaling points)

    @property
    def unique_blobs(self) -> list[BlobInfo]:
        seen: dict[str, BlobInfo] = {}
        for img in self.images:
            for layer in img.layers:
                if layer.digest not in seen:
                    seen[layer.digest] = BlobInfo(layer.digest, layer.size,
                                                  _tar_size(layer), img.repo)
        return list(seen.values())

    @property
    def gz_bytes(self) -> int:
        return sum(b.size for b in self.unique_blobs)

    @property
    def tar_bytes(self) -> int:
        return sum(b.tar_size for b in self.unique_blobs)

    @property
    def n_layers(self) -> int:
        return len(self.unique_blobs)

    @property
    def n_files(self) -> int:
        seen, total = set(), 0
        for img in self.images:
            for layer in img.layers:
                if layer.digest not in seen:
                    seen.add(layer.digest)
                    total += getattr(layer, "n_files", 0) or _count_files(layer)
        return total


def _tar_size(layer) -> int:
    if isinstance(layer, LayerFile):
        return layer.tar_size
    return len(layer.tar)


def _count_files(layer) -> int:
    return sum(1 for e in getattr(layer, "entries", ()) if isinstance(e, File))


def _scaled(spec, scale: float):
    n, size = spec
    return max(1, round(n * scale)), max(64 << 10, round(size * scale))


def cached_layer(cache: Path, seed: str, spec, prefix: str) -> LayerFile:
    """random_tree_layer, reused from `cache` when already written."""
    n_files, total = spec
    path = cache / f"{seed.replace('/', '_')}-{n_files}-{total}-l{LEVEL}.tar.gz"
    meta = path.with_name(path.name + ".json")
    if path.exists() and meta.exists():
        return LayerFile(path=path, **json.loads(meta.read_text()))
    layer = random_tree_layer(seed, n_files, total, path, "gzip", prefix=prefix, level=LEVEL)
    meta.write_text(json.dumps({k: v for k, v in layer.__dict__.items() if k != "path"}))
    return layer


# --------------------------------------------------------------------------
# the whiteout layer of the large set


def _listing(layer: LayerFile) -> list[tuple[str, str]]:
    """[(type char, path)] of a layer file, cached beside it."""
    cache = layer.path.with_name(layer.path.name + ".list.json")
    if cache.exists():
        return [tuple(x) for x in json.loads(cache.read_text())]
    out = subprocess.run(f"pigz -dc '{layer.path}' | tar -tv --numeric-owner",
                         shell=True, check=True, capture_output=True, text=True).stdout
    entries = []
    for line in out.splitlines():
        # drwxr-xr-x 0/0 0 2023-11-14 22:13 layer0/dir/  |  lrwxrwxrwx ... a -> b
        parts = line.split(None, 5)
        if len(parts) < 6:
            continue
        name = parts[5]
        if parts[0][0] == "l":
            name = name.split(" -> ", 1)[0]
        entries.append((parts[0][0], name.rstrip("/")))
    cache.write_text(json.dumps(entries))
    return entries


def _text(rng: random.Random, size: int, words: list[str]) -> bytes:
    out, n = [], 0
    while n < size:
        line = " ".join(rng.choices(words, k=rng.randint(3, 12))) + "\n"
        out.append(line)
        n += len(line)
    return "".join(out).encode()[:size]


def whiteout_layer(lower: list[LayerFile], spec, seed: str = "large/whiteouts") -> Layer:
    """A top layer that deletes ~2% of the lower files, a few whole directories,
    makes a few directories opaque (adding files in them), and adds its own
    files under ``top/`` — built in memory (it is small), deterministic."""
    rng = random.Random(seed)
    n_files, total = spec
    files, dirs = [], []
    for layer in lower:
        for kind, path in _listing(layer):
            if path.count("/") < 2:
                continue          # keep the layerN/ roots
            (dirs if kind == "d" else files).append(path)
    files.sort()
    dirs.sort()
    def related(a: str, b: str) -> bool:
        return a == b or a.startswith(b + "/") or b.startswith(a + "/")

    # Directories to delete whole and to make opaque: none inside another.
    touched: list[str] = []
    for d in rng.sample(dirs, min(60, len(dirs))):
        if len(touched) < 10 and not any(related(d, t) for t in touched):
            touched.append(d)
    gone_dirs, opaque = sorted(touched[:6]), sorted(touched[6:])

    def under_touched(p: str) -> bool:
        return any(related(p, t) for t in touched)

    candidates = [f for f in files if not under_touched(f)]
    gone_files = sorted(rng.sample(candidates, min(len(candidates), max(1, len(files) // 50))))

    entries = []
    parents: set[str] = set()
    for p in gone_files + gone_dirs + opaque:
        parts = p.split("/")
        upto = len(parts) if p in opaque else len(parts) - 1
        for i in range(1, upto + 1):
            parents.add("/".join(parts[:i]))
    # Directories first (tar order: a parent before what is in it).
    for d in sorted(parents):
        entries.append(Dir(d))
    for d in opaque:
        entries.append(Opaque(d))
        for j in range(2):
            entries.append(File(f"{d}/fresh-{j}.txt", _text(rng, 2000 + 500 * j, _WORDS)))
    for p in gone_dirs + gone_files:
        entries.append(Whiteout(p))
    # The layer's own files.
    top_dirs = ["top"] + [f"top/d{i}" for i in range(max(1, n_files // 16))]
    for d in top_dirs:
        entries.append(Dir(d))
    sizes = [rng.lognormvariate(0, 1.4) for _ in range(n_files)]
    k = total / sum(sizes)
    for i, w in enumerate(sizes):
        entries.append(File(f"{rng.choice(top_dirs)}/f{i}.txt", _text(rng, max(1, int(w * k)), _WORDS)))
    # tar order must keep a directory before its contents and the whiteouts
    # beside the files of the same layer; sort by path like the generator does.
    entries.sort(key=lambda e: _entry_path(e))
    return Layer(entries, compression="gzip", comment=f"whiteouts seed={seed}")


def _entry_path(e) -> str:
    name = e.tarinfo().name
    return name.rstrip("/")


_WORDS = ["alpha", "beta", "gamma", "delta", "config", "value", "return", "import", "self",
          "data", "error", "path", "None", "True", "def", "class", "for", "in", "if", "else",
          "the", "of", "and", "to", "a", "is", "that", "with", "as", "on", "lib", "usr",
          "share", "include", "static", "const", "int", "char", "void", "struct"]


# --------------------------------------------------------------------------
# the sets


def build_sets(cache: Path, scale: float = 1.0, names=("small", "large", "batch"),
               log=print) -> dict[str, BenchSet]:
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    sets: dict[str, BenchSet] = {}
    if "small" in names:
        log(f"generating/reusing small set (scale {scale}) in {cache}")
        layers = [cached_layer(cache, f"small/{i}", _scaled(s, scale), f"layer{i}/")
                  for i, s in enumerate(SMALL)]
        sets["small"] = BenchSet("small", [BenchImage("small", "bench/small", "latest",
                                                      Image(layers))],
                                 "3 layers")
    if "large" in names:
        log(f"generating/reusing large set (scale {scale}) in {cache}")
        lower = [cached_layer(cache, f"large/{i}", _scaled(s, scale), f"layer{i}/")
                 for i, s in enumerate(LARGE)]
        top = whiteout_layer(lower, _scaled(LARGE_TOP, scale))
        layers = lower + [top]
        big = BenchSet("large", [BenchImage("large", "bench/large", "latest", Image(layers))],
                       "8 layers, whiteouts in the 8th")
        for k in (1, 2, 4, 8):
            big.subsets[f"{k} layer{'s' if k > 1 else ''}"] = BenchSet(
                f"large-{k}", [BenchImage(f"large{k}", "bench/large", f"l{k}",
                                          Image(layers[:k]))], f"first {k} layers of large")
        sets["large"] = big
    if "batch" in names:
        log(f"generating/reusing batch set (scale {scale}) in {cache}")
        base = [cached_layer(cache, f"batch-base/{i}", _scaled(s, scale), f"base{i}/")
                for i, s in enumerate(BATCH_BASE)]
        images = []
        for i in range(BATCH_IMAGES):
            top = cached_layer(cache, f"batch-top/{i}", _scaled(BATCH_TOP, scale), f"app{i}/")
            images.append(BenchImage(f"app{i}", f"bench/app{i}", "latest", Image(base + [top])))
        batch = BenchSet("batch", images, f"{BATCH_IMAGES} images sharing a 2-layer base")
        for n in (1, 2, 5, 10):
            batch.subsets[f"{n} image{'s' if n > 1 else ''}"] = BenchSet(
                f"batch-{n}", images[:n], f"first {n} images of batch")
        sets["batch"] = batch
    return sets


def push_sets(registry, sets: dict[str, BenchSet], log=print) -> None:
    for s in sets.values():
        for img in s.images:
            push_image(registry, img.repo, img.tag, img.image)
        for sub in s.subsets.values():
            for img in sub.images:
                push_image(registry, img.repo, img.tag, img.image)
        log(f"pushed {s.name}: {len(s.images)} image(s), {s.n_layers} unique layers, "
            f"{s.gz_bytes / MB:.0f} MB gz, {s.tar_bytes / MB:.0f} MB tar, ~{s.n_files} files")
