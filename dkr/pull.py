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

from .auth import Credentials, docker_config_credentials
from .errors import DkrError
from .events import Events
from .glue import CurlGlue
from .hookspecs import StorageBackend
from .job import SinkError, TransferOptions
from .plugins import choose_backend
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
        self.transfer = TransferOptions(insecure=options.insecure, ca_file=options.ca_file)
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
        self._refuse_existing(local)
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
        await self._make_machine(plan, local, paths, backend)
        result.seconds = time.monotonic() - started
        self.events.emit("done", reference=str(ref), local=local, seconds=result.seconds,
                         fetched=result.layers_fetched, reused=result.layers_reused,
                         bytes=result.bytes_fetched)
        return result

    def _refuse_existing(self, local: str) -> None:
        if os.path.lexists(self.root.machine_path(local)) and not self.options.force:
            raise DkrError(f"machine {local!r} already exists in {self.root.path} "
                           "(use --force to replace it)")

    # --- layers ------------------------------------------------------------------
    async def _ensure_layer(self, client: RegistryClient, plan: ImagePlan, index: int,
                            layer: LayerPlan, parent: Path | None, backend: StorageBackend,
                            result: PullResult) -> Path:
        final = self.root.layer_path(layer.chain_id)
        async with self._locked(f"layer-{digest_hex(layer.chain_id)}",
                                f"building layer {digest_hex(layer.chain_id)[:12]}"):
            if final.exists():
                self._check_layer_backend(layer.chain_id, backend)
                self.events.emit("skipped", chain_id=layer.chain_id, digest=layer.digest)
                result.layers_reused += 1
                return final
            for leftover in self.root.leftovers(final.name):
                log.info("Removing %s left by an interrupted pull.", leftover.name)
                backend.remove(leftover)
            self.events.emit("layer-start", index=index + 1, count=len(plan.layers),
                             digest=layer.digest, size=layer.size, chain_id=layer.chain_id)
            tmp = self.root.layer_tmp(layer.chain_id)
            backend.create_layer(tmp, parent)
            try:
                unpacked = await self._fetch_into(client, plan.reference, layer, tmp,
                                                  backend.layer_format)
                backend.seal_layer(tmp)
                self.root.write_json(f"layers/{digest_hex(layer.chain_id)}.json", {
                    "chain_id": layer.chain_id, "diff_id": layer.diff_id,
                    "digest": layer.digest, "size": layer.size, "media_type": layer.media_type,
                    "parent": plan.layers[index - 1].chain_id if index else None,
                    "backend": backend.name, "tar_bytes": unpacked["tar_bytes"],
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
                os.rename(tmp, final)
            except BaseException:
                backend.remove(tmp)
                raise
        result.layers_fetched += 1
        result.bytes_fetched += layer.size
        self.events.emit("layer-done", chain_id=layer.chain_id, digest=layer.digest,
                         size=layer.size, tar_bytes=unpacked["tar_bytes"])
        return final

    def _check_layer_backend(self, chain_id: str, backend: StorageBackend) -> None:
        info = self.root.layer_info(chain_id) or {}
        made_by = info.get("backend", backend.name)
        if made_by != backend.name:
            raise DkrError(f"layer {digest_hex(chain_id)[:12]} in {self.root.path} was made by "
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
    async def _make_machine(self, plan: ImagePlan, local: str, layers: list[Path],
                            backend: StorageBackend) -> None:
        machine = self.root.machine_path(local)
        async with self._locked(f"machine-{local}", f"making machine {local}"):
            self._refuse_existing(local)
            for leftover in self.root.leftovers(f".dkr-local-{local}"):
                backend.remove(leftover)
            tmp = self.root.machine_tmp(local)
            try:
                backend.create_machine(tmp, layers)
                if os.path.lexists(machine):
                    exchange_paths(tmp, machine)      # never a moment without a machine
                    self._remove_old_machine(local, tmp, backend)
                else:
                    os.rename(tmp, machine)
            except BaseException:
                if os.path.lexists(tmp):
                    backend.remove(tmp)
                raise
            self.root.write_json(f"machines/{local}.json", {
                "local": local, "reference": str(plan.reference),
                "manifest_digest": plan.manifest_digest, "config_digest": plan.config_digest,
                "platform": plan.platform, "backend": backend.name,
                "layers": [layer.chain_id for layer in plan.layers],
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        self.events.emit("machine", local=local, path=str(machine))

    def _remove_old_machine(self, local: str, old: Path, backend: StorageBackend) -> None:
        info = self.root.machine_info(local) or {}
        from .plugins import backends
        made_by = backends().get(info.get("backend", backend.name), backend)
        made_by.remove(old)

    # --- locks -----------------------------------------------------------------------
    def _locked(self, name: str, note: str):
        return _AsyncFlock(self.root.meta / "locks" / f"{name}.lock", note)


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
