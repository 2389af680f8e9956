"""Pull orchestration: from a reference to a machine in the image root.

One ``Puller`` owns one CurlGlue (one CurlMulti for every transfer), one
registry client per host and the image root. For each image it resolves a
plan, makes sure every layer exists (fetching and extracting those that do
not, each under a lock, each made visible only by rename), and finally makes
the machine.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

from .auth import Credentials, docker_config_credentials
from .errors import DkrError
from .events import Events
from .glue import CurlGlue
from .hookspecs import StorageBackend
from .job import SinkError, TransferOptions
from .plugins import backends, choose_backend
from .reference import Reference, digest_hex, validate_machine_name
from .registry import RegistryClient
from .store import ImageRoot
from .treeops import remove_tree
from .unpack import LayerUnpacker
from .v2 import ImagePlan, LayerPlan, ManifestResolver, Platform

log = logging.getLogger("dkr.pull")

RENAME_EXCHANGE = 2
LOCK_POLL = 0.2


@dataclass
class PullOptions:
    image_root: Path = Path("/var/lib/machines")
    backend: str = "auto"
    force: bool = False
    platform: Platform | None = None
    insecure: bool = False
    ca_file: str | None = None
    credentials: Credentials | None = None
    jobs: int = 6
    retries: int = 4
    stall_timeout: int = 60


@dataclass
class PullResult:
    reference: str
    local: str
    manifest_digest: str
    layers_fetched: int = 0
    layers_reused: int = 0
    bytes_fetched: int = 0
    seconds: float = 0.0
    chain: list[str] = field(default_factory=list)


def exchange_paths(a: Path, b: Path) -> None:
    """Atomically swap two directory entries (renameat2 RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    AT_FDCWD = -100
    if libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(b))


class Puller:
    def __init__(self, options: PullOptions, events: Events | None = None):
        self.options = options
        self.events = events or Events()
        self.root = ImageRoot(options.image_root)
        self.transfer = TransferOptions(insecure=options.insecure, ca_file=options.ca_file,
                                        retries=options.retries,
                                        low_speed_time=options.stall_timeout)
        self.glue: CurlGlue | None = None
        self._clients: dict[str, RegistryClient] = {}
        self._backend: StorageBackend | None = None

    async def __aenter__(self) -> "Puller":
        self.glue = CurlGlue(max_host_connections=self.options.jobs)
        return self

    async def __aexit__(self, *exc) -> None:
        if self.glue is not None:
            self.glue.close()
            self.glue = None

    # --- set-up ----------------------------------------------------------------
    def backend(self) -> StorageBackend:
        if self._backend is None:
            self.root.prepare()
            self._backend, why = choose_backend(self.options.backend, self.root.path)
            self.events.emit("backend", name=self._backend.name, why=why)
        return self._backend

    async def client(self, ref: Reference) -> RegistryClient:
        host = ref.endpoint
        if host not in self._clients:
            creds = self.options.credentials or docker_config_credentials(ref.host)
            client = RegistryClient(self.glue, host, credentials=creds, options=self.transfer)
            await client.ping()
            self._clients[host] = client
        return self._clients[host]

    # --- one image ---------------------------------------------------------------
    async def pull(self, ref: Reference, local: str) -> PullResult:
        started = time.monotonic()
        validate_machine_name(local)
        backend = self.backend()
        self.refuse_existing(local)
        client = await self.client(ref)
        plan = await ManifestResolver(client, ref, self.options.platform).resolve()
        self.events.emit("resolved", reference=str(ref), digest=plan.manifest_digest,
                         platform=plan.platform, layers=len(plan.layers))
        self.root.save_blob(plan.manifest_digest, plan.manifest)
        self.root.save_blob(plan.config_digest, plan.config)
        result = PullResult(str(ref), local, plan.manifest_digest,
                            chain=[layer.chain_id for layer in plan.layers])
        paths: list[Path] = []
        for index, layer in enumerate(plan.layers):
            parent = paths[-1] if paths else None
            paths.append(await self._ensure_layer(client, plan, index, layer, parent, backend, result))
        await self.make_machine(local, paths, backend, {
            "reference": str(ref), "manifest_digest": plan.manifest_digest,
            "config_digest": plan.config_digest, "platform": plan.platform,
            "layers": [digest_hex(layer.chain_id) for layer in plan.layers]})
        result.seconds = time.monotonic() - started
        self.events.emit("done", reference=str(ref), local=local, seconds=result.seconds,
                         fetched=result.layers_fetched, reused=result.layers_reused,
                         bytes=result.bytes_fetched)
        return result

    def refuse_existing(self, local: str) -> None:
        if os.path.lexists(self.root.machine_path(local)) and not self.options.force:
            raise DkrError(f"machine {local!r} already exists in {self.root.path} "
                           "(use --force to replace it)")

    # --- layers ------------------------------------------------------------------
    async def _ensure_layer(self, client: RegistryClient, plan: ImagePlan, index: int,
                            layer: LayerPlan, parent: Path | None, backend: StorageBackend,
                            result: PullResult) -> Path:
        key = digest_hex(layer.chain_id)
        meta = {"chain_id": layer.chain_id, "diff_id": layer.diff_id, "digest": layer.digest,
                "size": layer.size, "media_type": layer.media_type,
                "parent": plan.layers[index - 1].chain_id if index else None}
        announce = dict(index=index + 1, count=len(plan.layers), digest=layer.digest,
                        size=layer.size, chain_id=layer.chain_id)

        async def fetch(tree: Path) -> dict:
            return await self._fetch_into(client, plan.reference, layer, tree, backend.layer_format)

        return await self.ensure_layer(key, parent, backend, fetch, meta, announce, result)

    async def ensure_layer(self, key: str, parent: Path | None, backend: StorageBackend,
                           fetch: Callable[[Path], Awaitable[dict]], meta: dict,
                           announce: dict, result: PullResult) -> Path:
        """Make layer ``key`` exist: reuse it, or build it from ``fetch`` under its lock.

        ``fetch(tree)`` fills the prepared temp tree and returns the extractor's
        report (with ``tar_bytes``) once every check has passed; only then does the
        layer get its final name.
        """
        final = self.root.layer_path(key)
        async with self._locked(f"layer-{key}", f"building layer {key[:12]}"):
            if final.exists():
                self._check_layer_backend(key, backend)
                self.events.emit("skipped", chain_id=key, digest=announce.get("digest", key))
                result.layers_reused += 1
                return final
            for leftover in self.root.leftovers(final.name):
                log.info("Removing %s left by an interrupted pull.", leftover.name)
                backend.remove(leftover)
            self.events.emit("layer-start", **announce)
            tmp = self.root.layer_tmp(key)
            backend.create_layer(tmp, parent)
            try:
                unpacked = await fetch(tmp)
                backend.seal_layer(tmp)
                self.root.write_json(f"layers/{key}.json", {
                    **meta, "backend": backend.name, "tar_bytes": unpacked["tar_bytes"],
                    "created": _now()})
                os.rename(tmp, final)
            except BaseException:
                backend.remove(tmp)
                raise
        result.layers_fetched += 1
        result.bytes_fetched += announce.get("size") or 0
        self.events.emit("layer-done", chain_id=key, digest=announce.get("digest", key),
                         size=announce.get("size") or 0, tar_bytes=unpacked["tar_bytes"])
        return final

    def _check_layer_backend(self, key: str, backend: StorageBackend) -> None:
        info = self.root.layer_info(key) or {}
        made_by = info.get("backend", backend.name)
        if made_by != backend.name:
            raise DkrError(f"layer {key[:12]} in {self.root.path} was made by "
                           f"backend {made_by}, not {backend.name} (use --backend {made_by})")

    async def _fetch_into(self, client: RegistryClient, ref: Reference, layer: LayerPlan,
                          tree: Path, layer_format: str) -> dict:
        label = f"layer {layer.digest}"
        unpacker = LayerUnpacker(tree, layer_format)
        sink = await unpacker.start()
        try:
            response = await client.get(f"/v2/{ref.name}/blobs/{layer.digest}",
                                        scope=f"repository:{ref.name}:pull", sink=sink,
                                        expected_size=layer.size, what=label)
        except SinkError:
            unpacked = await unpacker.finish()
            raise DkrError(f"{label}: {unpacked.get('error', 'extractor stopped reading')}") from None
        except BaseException:
            await unpacker.abort()
            raise
        if response.status != 200:
            await unpacker.abort()
            raise DkrError(f"{label}: registry answered {response.status}")
        unpacked = await unpacker.finish()
        if "error" in unpacked:
            raise DkrError(f"{label}: {unpacked['error']}")
        if "sha256:" + response.sha256 != layer.digest:
            raise DkrError(f"{label}: content does not match its digest "
                           f"(got sha256:{response.sha256})")
        if unpacked["diff_id"] != layer.diff_id:
            raise DkrError(f"{label}: unpacked content has DiffID {unpacked['diff_id']}, "
                           f"the config says {layer.diff_id}")
        return unpacked

    # --- the machine -----------------------------------------------------------------
    async def make_machine(self, local: str, layers: list[Path], backend: StorageBackend,
                           record: dict) -> None:
        """Make ``IMAGE_ROOT/LOCAL`` from ``layers``; ``record`` says where it came from."""
        machine = self.root.machine_path(local)
        async with self._locked(f"machine-{local}", f"making machine {local}"):
            self.refuse_existing(local)
            for leftover in self.root.leftovers(f".dkr-local-{local}"):
                backend.remove(leftover)
            tmp = self.root.machine_tmp(local)
            try:
                backend.create_machine(tmp, layers)
                if os.path.lexists(machine):
                    old_backend = self._machine_backend(local, backend)
                    old_backend.deactivate_machine(machine)
                    exchange_paths(tmp, machine)      # never a moment without a machine
                    old_backend.remove(tmp)
                else:
                    os.rename(tmp, machine)
                backend.activate_machine(machine, layers)
            except BaseException:
                if os.path.lexists(tmp):
                    backend.remove(tmp)
                raise
            self.root.write_json(f"machines/{local}.json", {
                **record, "local": local, "backend": backend.name, "created": _now()})
        self.events.emit("machine", local=local, path=str(machine))

    def _machine_backend(self, local: str, default: StorageBackend) -> StorageBackend:
        """The backend that made an existing machine (it knows how to take it down)."""
        info = self.root.machine_info(local) or {}
        return backends().get(info.get("backend", default.name), default)

    # --- locks -----------------------------------------------------------------------
    def _locked(self, name: str, note: str):
        return _AsyncFlock(self.root.meta / "locks" / f"{name}.lock", note)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class _AsyncFlock:
    """An flock that waits without blocking the event loop (other transfers go on)."""

    def __init__(self, path: Path, note: str):
        self.path = path
        self.note = note
        self.fd = -1

    async def __aenter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        announced = False
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(self.fd)
                    raise
            if not announced:
                log.info("Waiting for another dkr process %s.", self.note)
                announced = True
            await asyncio.sleep(LOCK_POLL)

    async def __aexit__(self, *exc):
        os.close(self.fd)
