"""The rows of the benchmark: dkr on each backend, its peers, and the limits.

A row knows which tools it needs (`missing()` says what is not installed),
the commands that pull a set into a fresh destination (`commands()`; they
are timed together), and where the trees it made are (`trees()`, used to
check them against umoci's after the timed part).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from measure import dkr_classes


@dataclass
class Ctx:
    dest: Path          # a fresh, empty, loop-mounted btrfs
    bset: object        # sets.BenchSet
    host: str           # registry host:port
    dkr: str            # path of the dkr executable
    policy: Path        # containers-policy.json accepting anything (skopeo)


class Row:
    key = ""
    label = ""
    kind = "peer"           # "dkr" | "peer" | "limit"
    tools: tuple = ()
    classify = None
    verifiable = True

    def missing(self) -> str | None:
        absent = [t for t in self.tools if shutil.which(t) is None]
        return f"{', '.join(absent)} not installed" if absent else None

    def commands(self, ctx: Ctx) -> tuple[list, int]:
        """(commands, how many may run at once)."""
        raise NotImplementedError

    @contextmanager
    def trees(self, ctx: Ctx):
        """{machine name: path of the final tree} while in the block."""
        yield {}


class Dkr(Row):
    kind = "dkr"
    classify = staticmethod(dkr_classes)

    def __init__(self, backend: str, dkr: str):
        self.backend = backend
        self.key = f"dkr-{backend}"
        self.label = f"dkr ({backend})"
        self.dkr = dkr

    def missing(self):
        return None if Path(self.dkr).exists() or shutil.which(self.dkr) else f"{self.dkr} not found"

    def commands(self, ctx):
        root = ctx.dest / "machines"
        root.mkdir(exist_ok=True)
        cmd = [self.dkr, "pull", "--insecure", "--image-root", str(root),
               "--backend", self.backend, "--stats"]
        images = ctx.bset.images
        if len(images) == 1:
            cmd += [images[0].ref(ctx.host), images[0].name]
        else:
            batch = ctx.dest / "batch.txt"
            batch.write_text("".join(f"{i.ref(ctx.host)} {i.name}\n" for i in images))
            cmd += ["--batch", str(batch)]
        return [cmd], 1

    @contextmanager
    def trees(self, ctx):
        yield {i.name: ctx.dest / "machines" / i.name for i in ctx.bset.images}


class Podman(Row):
    tools = ("podman",)

    def __init__(self, driver: str):
        self.driver = driver
        self.key = f"podman-{driver}"
        self.label = f"podman pull ({driver})"

    def _base(self, ctx):
        return ["podman", "--root", str(ctx.dest / "podman" / "root"),
                "--runroot", str(ctx.dest / "podman" / "run"),
                "--storage-driver", self.driver, "--log-level", "error"]

    def commands(self, ctx):
        # podman pulls the images one after the other; blobs it already has
        # (the shared base of the batch set) are not fetched again.
        return [[*self._base(ctx), "pull", "--tls-verify=false", "-q",
                 *(i.ref(ctx.host) for i in ctx.bset.images)]], 1

    @contextmanager
    def trees(self, ctx):
        mounted, out = [], {}
        try:
            for img in ctx.bset.images:
                ref = img.ref(ctx.host)
                path = subprocess.run([*self._base(ctx), "image", "mount", ref], check=True,
                                      capture_output=True, text=True).stdout.strip()
                mounted.append(ref)
                out[img.name] = Path(path)
            yield out
        finally:
            for ref in mounted:
                subprocess.run([*self._base(ctx), "image", "unmount", ref], capture_output=True)


class SkopeoUmoci(Row):
    key = "skopeo-umoci"
    label = "skopeo copy + umoci unpack"
    tools = ("skopeo", "umoci")

    def commands(self, ctx):
        layout = ctx.dest / "oci"
        cmds = []
        # One OCI layout for all images: skopeo skips blobs the layout has.
        for img in ctx.bset.images:
            cmds.append(["skopeo", "--policy", str(ctx.policy), "copy", "-q",
                         "--src-tls-verify=false", f"docker://{img.ref(ctx.host)}",
                         f"oci:{layout}:{img.name}"])
            cmds.append(["umoci", "unpack", "--image", f"{layout}:{img.name}",
                         str(ctx.dest / f"bundle-{img.name}")])
        return cmds, 1

    @contextmanager
    def trees(self, ctx):
        yield {i.name: ctx.dest / f"bundle-{i.name}" / "rootfs" for i in ctx.bset.images}


def _blob_url(ctx, blob) -> str:
    return f"http://{ctx.host}/v2/{blob.repo}/blobs/{blob.digest}"


class CurlNull(Row):
    key = "curl-null"
    label = "limit: parallel curl > /dev/null"
    kind = "limit"
    tools = ("curl",)
    verifiable = False

    def commands(self, ctx):
        cmd = ["curl", "-sSf", "--parallel", "--parallel-max", "6"]
        for blob in ctx.bset.unique_blobs:
            cmd += ["-o", "/dev/null", _blob_url(ctx, blob)]
        return [cmd], 1


class Floor(Row):
    key = "floor"
    label = "floor: curl | pigz -dc | tar -x, 2 at a time"
    kind = "limit"
    tools = ("curl", "pigz", "tar", "bash")
    verifiable = False

    def commands(self, ctx):
        cmds = []
        # Largest first: the best order for two slots.
        blobs = sorted(ctx.bset.unique_blobs, key=lambda b: -b.size)
        for i, blob in enumerate(blobs):
            d = ctx.dest / "floor" / str(i)
            d.mkdir(parents=True)
            cmds.append(["bash", "-o", "pipefail", "-c",
                         f"curl -sSf '{_blob_url(ctx, blob)}' | pigz -dc | tar -x -C '{d}'"])
        return cmds, 2


def all_rows(dkr: str) -> list[Row]:
    return [Dkr("btrfs", dkr), Dkr("overlay", dkr), Dkr("dir", dkr),
            Podman("btrfs"), Podman("overlay"), SkopeoUmoci(), CurlNull(), Floor()]


def write_policy(path: Path) -> Path:
    path.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    return path
