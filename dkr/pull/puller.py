"""Pull orchestration: from references to machines in the image root.

One ``Puller`` owns one CurlGlue (one CurlMulti for every transfer), one
registry client per host, the spool and the image root; any number of images
may be pulled through it at once. For each image it resolves a plan, claims
every layer it lacks (an flock per layer, and an in-process table so that two
images needing one layer build it once), starts all their downloads at once,
extracts each layer as soon as its bytes arrive and its parent exists (or,
staging ahead, inflates and checks it at once and replays it into the
parent's snapshot later: see dkr.staging), makes it visible by rename, and
finally makes the machine.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Protocol

from dkr.errors import DkrError, os_error_text
from dkr.events import Events
from dkr.fsinfo import is_mount_point
from dkr.hookspecs import StorageBackend
from dkr.plugins import backend_on_disk, backends, choose_backend
from dkr.pull.spool import ResumedBlobMismatch, Spool, SpooledBlob, download
from dkr.registry.auth import Credentials
from dkr.registry.client import RegistryClient
from dkr.registry.keychain import HelperQuestion, credential_sources
from dkr.registry.reference import Reference, digest_hex, validate_machine_name
from dkr.registry.signatures import Trust
from dkr.registry.v2 import ImagePlan, LayerPlan, ManifestResolver, Platform
from dkr.store.layout import ImageRoot, remove_entry
from dkr.store.locks import AsyncFlock
from dkr.tasks import failed, retrieved, to_the_end
from dkr.transport.glue import CurlGlue
from dkr.transport.job import TransferOptions
from dkr.transport.trust import trusted_pem
from dkr.treeops import remove_tree
from dkr.unpack.extractors import ExtractorPool, LayerUnpacker

log = logging.getLogger("dkr.pull")

RENAME_EXCHANGE = 2


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
    spool_limit: int | None = 4 * 1024**3     # bytes of blobs downloaded ahead of extraction
    stage_ahead: str = "auto"     # stage stacked layers before their parent is done: always, never, auto
    signature_policy: str | None = None   # policy.json (None: where podman looks)
    registries_d: str | None = None       # registries.d directory (None: where podman looks)


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
    recorded_stats: int = 0       # without root: owners kept in an xattr, not applied
    device_stand_ins: int = 0     # without root: device nodes left as marked empty files
    skipped_xattrs: int = 0       # extended attributes the file system or user may not set


def exchange_paths(a: Path, b: Path) -> None:
    """Atomically swap two directory entries (renameat2 RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    AT_FDCWD = -100
    if libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(b))


class LayerTree:
    """A layer's complete tree, wherever it is: under its temp name while it is
    sealed (child layers are copied from it then), under its final name after.

    A child copied after its parent was committed (in a batch, an image that
    comes late to a shared base) must not look for the temp name.
    """

    def __init__(self, path: Path):
        self.path = path

    def rename(self, final: Path) -> None:
        os.rename(self.path, final)
        self.path = final


@dataclass
class LayerClaim:
    """A layer an image needs, and where it stands.

    ``tree`` gives the layer's LayerTree as soon as it is extracted and
    checked: a child layer may be copied from it then. ``future`` gives the
    final path once the layer is committed. ``lock`` is held while we build it.
    """

    key: str
    future: asyncio.Future
    tree: asyncio.Future
    lock: AsyncFlock | None = None
    owner: bool = True            # False: another image of this run builds it
    sharers: int = 0              # other images of this run that wait for our build


class Puller:
    def __init__(self, options: PullOptions, events: Events | None = None):
        self.options = options
        self.events = events or Events()
        self.root = ImageRoot(options.image_root)
        self.transfer = TransferOptions(insecure=options.insecure,
                                        ca_pem=trusted_pem(options.ca_file, options.insecure),
                                        retries=options.retries,
                                        low_speed_time=options.stall_timeout)
        self.glue: CurlGlue | None = None
        self.spool = Spool(self.root.meta / "partial", options.spool_limit)
        self._clients: dict[tuple[str, Credentials | None], asyncio.Future] = {}
        self._helper_answers: dict[HelperQuestion, asyncio.Future] = {}
        self._helpers_stop = threading.Event()
        self._backend: StorageBackend | None = None
        self._builds: dict[str, LayerClaim] = {}
        self._extractors: asyncio.Semaphore | None = None
        self._stage_ahead = _stage_ahead(options.stage_ahead)
        self._no_gc = AsyncFlock(self.root.meta / "locks" / "gc.lock", "running gc", shared=True)
        self.trust = Trust(options.signature_policy, options.registries_d)

    async def __aenter__(self) -> "Puller":
        self.glue = CurlGlue(max_host_connections=self.options.jobs)
        self._extractors = asyncio.Semaphore(os.cpu_count() or 2)
        self.extractor_pool = ExtractorPool()
        self._setting_up = asyncio.Lock()
        return self

    async def __aexit__(self, *exc) -> None:
        try:
            await self.extractor_pool.close()
        finally:                      # also when that wait is cancelled (by an API user)
            self._helpers_stop.set()  # a helper still asked is killed: no waiting for it
            self.spool.close()
            self.trust.close()
            self._no_gc.release()
            if self.glue is not None:
                self.glue.close()
                self.glue = None

    # --- set-up ----------------------------------------------------------------
    async def backend(self) -> StorageBackend:
        async with self._setting_up:          # many images of a batch may ask at once
            if self._backend is None:
                self.root.prepare()
                self.extractor_pool.warm()    # starts up while the manifests come in
                await self._no_gc.acquire()   # gc waits until this run is over
                self._backend, why = choose_backend(self.options.backend, self.root.path)
                self.events.emit("backend", name=self._backend.name, why=why)
        return self._backend

    async def client(self, ref: Reference) -> RegistryClient:
        """One client per registry host and login, pinged once even when many images
        ask at once. Images of a batch on one host may have different logins: an
        auth file may name a repository's namespace."""
        creds = self.options.credentials or await self._login(ref)
        key = (ref.endpoint, creds)
        if key not in self._clients:
            self._clients[key] = asyncio.ensure_future(self._connect(ref.endpoint, creds))
        try:
            return await asyncio.shield(self._clients[key])
        except DkrError:
            self._clients.pop(key, None)
            raise

    async def _login(self, ref: Reference) -> Credentials | None:
        """The login for ``ref`` from the auth files, read for each image (one may name
        its namespace). Each credential helper question is put once per run, off the
        event loop (a helper may wait for a keyring to unlock), and what it answered,
        or how it failed, serves every image that asks it."""
        for source in credential_sources(ref.host, ref.name):
            if isinstance(source, HelperQuestion):
                if source not in self._helper_answers:
                    asking = asyncio.ensure_future(
                        asyncio.to_thread(source.ask, self._helpers_stop))
                    asking.add_done_callback(retrieved)
                    self._helper_answers[source] = asking
                source = await asyncio.shield(self._helper_answers[source])
            if source:
                return source
        return None

    async def _connect(self, endpoint: str, creds: Credentials | None) -> RegistryClient:
        client = RegistryClient(self.glue, endpoint, credentials=creds, options=self.transfer)
        await client.ping()
        return client

    def refuse_existing(self, local: str) -> None:
        if os.path.lexists(self.root.machine_path(local)) and not self.options.force:
            raise DkrError(f"machine {local!r} already exists in {self.root.path} "
                           "(use --force to replace it)")

    # --- one image ---------------------------------------------------------------
    async def pull(self, ref: Reference, local: str) -> PullResult:
        started = time.monotonic()
        validate_machine_name(local)
        backend = await self.backend()
        self.refuse_existing(local)
        client = await self.client(ref)
        plan = await ManifestResolver(client, ref, self.options.platform).resolve()
        # The manifest that is pulled (an index's picked one) is judged before any layer.
        accepted = await self.trust.check(client, ref, plan.manifest_digest)
        self.events.emit("resolved", reference=str(ref), digest=plan.manifest_digest,
                         platform=plan.platform, layers=len(plan.layers))
        result = PullResult(str(ref), local, plan.manifest_digest,
                            chain=[layer.chain_id for layer in plan.layers])
        paths = await self._layers(client, plan, backend, result)
        self.root.save_blob(plan.manifest_digest, plan.manifest)
        self.root.save_blob(plan.config_digest, plan.config)
        await self.make_machine(local, paths, backend, {
            "reference": str(ref), "manifest_digest": plan.manifest_digest,
            "config_digest": plan.config_digest, "platform": plan.platform,
            "layers": [digest_hex(layer.chain_id) for layer in plan.layers],
            "accepted": accepted})
        return self.finish(result, started)

    def finish(self, result: PullResult, started: float) -> PullResult:
        """Say what a finished pull did, including what it could not apply."""
        result.seconds = time.monotonic() - started
        if result.recorded_stats or result.device_stand_ins:
            # (the extractor's modules stay out of here until needed)
            from dkr.unpack.extract import OVERRIDE_STAT_XATTR
            log.warning("Not running as root: file owners or modes (%d entries) and device "
                        "nodes (%d) were not applied; they are recorded in the %s xattr.",
                        result.recorded_stats, result.device_stand_ins, OVERRIDE_STAT_XATTR)
        if result.skipped_xattrs:
            log.warning("%d extended attributes (e.g. file capabilities) could not be set "
                        "here and were left out.", result.skipped_xattrs)
        self.events.emit("done", reference=result.reference, local=result.local,
                         seconds=result.seconds, fetched=result.layers_fetched,
                         reused=result.layers_reused, bytes=result.bytes_fetched)
        return result

    async def _layers(self, client: RegistryClient, plan: ImagePlan, backend: StorageBackend,
                      result: PullResult) -> list[Path]:
        """Every layer of ``plan``, built or reused, base first."""
        claims: list[LayerClaim] = []
        prefetched: dict[str, SpooledBlob] = {}
        try:
            try:
                for layer in plan.layers:
                    claims.append(await self.claim_layer(digest_hex(layer.chain_id), backend,
                                                         result, layer.digest))
            except Exception as failure:
                # Other images may have joined the builds we took on so far: those
                # (and the layers below them) are still theirs to get. The rest we
                # give up now, so that an image that comes meanwhile takes them on.
                needed = _last_shared(claims) + 1
                for claim in claims[needed:]:
                    self._abandon(claim)
                try:
                    await self._build_claims(client, plan, backend, prefetched, result,
                                             claims[:needed])
                except Exception:
                    pass          # theirs to report: the claims' futures carry it
                raise failure
            return await self._build_claims(client, plan, backend, prefetched, result, claims)
        finally:
            for claim in claims:
                self._abandon(claim)
            for blob in prefetched.values():
                self.spool.release(blob, keep_partial=True)

    async def _build_claims(self, client: RegistryClient, plan: ImagePlan,
                            backend: StorageBackend, prefetched: dict[str, SpooledBlob],
                            result: PullResult, claims: list[LayerClaim]) -> list[Path]:
        """Build ``claims``, the first layers of ``plan``, or wait for them."""
        for claim, layer in zip(claims, plan.layers):
            if claim.lock is not None and claim.key not in prefetched:
                prefetched[claim.key] = self._start_download(client, plan.reference, layer)
        # All layers go at once: a stacked one waits for its parent's tree (not its
        # commit) to snapshot it, and commits only after its parent did.
        return await _all_or_nothing([
            self._v2_build(claim, index, plan, backend, client, prefetched, result,
                           claims[index - 1] if index else None)
            for index, claim in enumerate(claims)],
            spare=lambda index: self._still_shared(claims[index]))

    async def _v2_build(self, claim: LayerClaim, index: int, plan: ImagePlan,
                        backend: StorageBackend, client: RegistryClient,
                        prefetched: dict[str, SpooledBlob], result: PullResult,
                        parent: LayerClaim | None) -> Path:
        layer = plan.layers[index]
        meta = {"chain_id": layer.chain_id, "diff_id": layer.diff_id, "digest": layer.digest,
                "size": layer.size, "media_type": layer.media_type,
                "parent": plan.layers[index - 1].chain_id if index else None}
        announce = dict(index=index + 1, count=len(plan.layers), digest=layer.digest,
                        size=layer.size, chain_id=layer.chain_id)

        def take_blob() -> SpooledBlob:
            return prefetched.pop(claim.key, None) or \
                self._start_download(client, plan.reference, layer)

        if claim.lock is None:
            return await _outcome(claim.future)
        self._remove_leftovers(claim.key, backend)
        stage = None
        stacked = parent is not None and backend.layer_format == "stacked"
        if stacked and not parent.tree.done() and self._stage_ahead:
            stage = self._stage(claim.key, take_blob(), layer, backend.layer_format)

        fill = _SpooledFill(self, layer, backend.layer_format, take_blob, stage)
        try:
            parent_tree = await _parent_tree(parent.tree, stage) if stacked else None
            return await self.build_layer(claim, parent_tree, backend, fill, meta, announce,
                                          result, parent_committed=parent.future if parent else None)
        finally:
            if stage is not None:
                await to_the_end(stage.discard())

    # --- layers: claim, build -------------------------------------------------------
    async def claim_layer(self, key: str, backend: StorageBackend, result: PullResult,
                          digest: str = "") -> LayerClaim:
        """Reuse layer ``key``, share its build with another image, or take it on."""
        shared = self._builds.get(key)
        if shared is not None:
            shared.sharers += 1
            return LayerClaim(key, shared.future, shared.tree, owner=False)
        loop = asyncio.get_running_loop()
        future, tree = loop.create_future(), loop.create_future()
        future.add_done_callback(retrieved)
        tree.add_done_callback(retrieved)
        claim = LayerClaim(key, future, tree, self._locked(f"layer-{key}", f"building layer {key[:12]}"))
        self._builds[key] = claim
        try:
            await claim.lock.acquire()
            final = self.root.layer_path(key)
            if final.exists():
                claim.lock.release()
                claim.lock = None
                self._check_layer_backend(key, backend)
                self.events.emit("skipped", chain_id=key, digest=digest or key)
                result.layers_reused += 1
                future.set_result(final)
                tree.set_result(LayerTree(final))
        except BaseException as e:
            self._abandon(claim, e)
            raise
        return claim

    async def build_layer(self, claim: LayerClaim, parent: LayerTree | None,
                          backend: StorageBackend, fill: LayerFill,
                          meta: dict, announce: dict, result: PullResult,
                          parent_committed: asyncio.Future | None = None) -> Path:
        """Build a claimed layer with ``fill`` and make it visible by rename.

        ``fill`` starts before the temp tree is made (a snapshot may take a
        while) and fills it once it is. A resumed download that turns out
        wrong is thrown away and the layer starts over once, from an empty
        tree. Sealing (which may wait for the layer's data to reach disk)
        runs in a helper process and recording on a worker thread, while
        child layers already start from the finished tree; the rename waits
        for the parent's, so a layer never becomes visible before the layer
        below it.
        """
        final = self.root.layer_path(claim.key)
        try:
            self.events.emit("layer-start", **announce)
            for last_try in (False, True):
                tmp = self.root.layer_tmp(claim.key)
                await fill.start()
                began = time.monotonic()
                try:
                    backend.create_layer(tmp, parent and parent.path)
                except BaseException:
                    await to_the_end(fill.close())
                    raise
                try:
                    prepared = time.monotonic()
                    unpacked = await fill.fill(tmp)
                    extracted = time.monotonic()
                    tree = LayerTree(tmp)
                    claim.tree.set_result(tree)
                    self.events.emit("layer-extracted", chain_id=claim.key,
                                     digest=announce.get("digest", claim.key))
                    await self._seal(backend, tmp, claim.key, meta, unpacked)
                    sealed = time.monotonic()
                    if parent_committed is not None:
                        await _outcome(parent_committed)
                    tree.rename(final)
                    break
                except ResumedBlobMismatch as e:
                    backend.remove(tmp)
                    if last_try:
                        raise DkrError(str(e)) from None
                    log.warning("%s; starting this layer over.", e)
                except BaseException:
                    backend.remove(tmp)
                    raise
            claim.future.set_result(final)
        except BaseException as e:
            self._abandon(claim, e)
            raise
        self._abandon(claim)
        result.layers_fetched += 1
        result.bytes_fetched += announce.get("size") or 0
        result.recorded_stats += unpacked.get("recorded_owners", 0)
        result.device_stand_ins += unpacked.get("skipped_devices", 0)
        result.skipped_xattrs += unpacked.get("skipped_xattrs", 0)
        self.events.emit("layer-done", chain_id=claim.key, digest=announce.get("digest", claim.key),
                         size=announce.get("size") or 0, tar_bytes=unpacked["tar_bytes"],
                         prepare_seconds=prepared - began,
                         extract_seconds=unpacked.get("busy_seconds", extracted - prepared),
                         commit_seconds=sealed - extracted)
        return final

    def _remove_leftovers(self, key: str, backend: StorageBackend) -> None:
        """What an interrupted pull left of a layer we hold the lock of."""
        for leftover in self.root.leftovers(self.root.layer_path(key).name):
            log.info("Removing %s left by an interrupted pull.", leftover.name)
            backend.remove(leftover)

    async def _seal(self, backend: StorageBackend, tree: Path, key: str, meta: dict,
                    unpacked: dict) -> None:
        """Seal and record a layer, off the event loop: both wait for its data to reach disk."""
        loop = asyncio.get_running_loop()
        sealed = await self.extractor_pool.run_job({"seal": str(tree), "backend": backend.name})
        if sealed.get("unknown"):     # a backend only this process knows (registered by hand)
            await loop.run_in_executor(None, backend.seal_layer, tree)
        elif "error" in sealed:
            raise DkrError(sealed["error"])
        await loop.run_in_executor(None, self.root.write_json, f"layers/{key}.json", {
            **meta, "backend": backend.name, "tar_bytes": unpacked["tar_bytes"],
            "created": _now()})

    async def ensure_layer(self, key: str, parent: Path | None, backend: StorageBackend,
                           fetch: Callable[[Path], Awaitable[dict]], meta: dict,
                           announce: dict, result: PullResult) -> Path:
        """Claim and, if needed, build one layer: the sequential form (v1 uses it)."""
        claim = await self.claim_layer(key, backend, result, announce.get("digest", key))
        if claim.lock is None:
            return await _outcome(claim.future)
        self._remove_leftovers(key, backend)
        return await self.build_layer(claim, parent and LayerTree(parent), backend,
                                      TreeFill(fetch), meta, announce, result)

    def _still_shared(self, claim: LayerClaim) -> bool:
        """Our image failed: go on building ``claim`` if another image waits for it,
        else let no other image join its build from now on (it is about to stop)."""
        if claim.sharers:
            return True
        if self._builds.get(claim.key) is claim:
            del self._builds[claim.key]
        return False

    def _abandon(self, claim: LayerClaim, error: BaseException | None = None) -> None:
        """Release what a claim holds; a layer never built fails its waiters."""
        if not claim.owner:
            return                    # its builder decides how it ends
        if claim.lock is not None:
            claim.lock.release()
            claim.lock = None
        if not claim.future.done():
            if self._builds.get(claim.key) is claim:
                del self._builds[claim.key]
            failure = error if isinstance(error, Exception) else \
                DkrError(f"layer {claim.key[:12]} was not built (an earlier step failed)")
            claim.future.set_exception(failure)
            if not claim.tree.done():
                claim.tree.set_exception(failure)

    def _check_layer_backend(self, key: str, backend: StorageBackend) -> None:
        info = self.root.layer_info(key) or {}
        made_by = info.get("backend", backend.name)
        if made_by != backend.name:
            raise DkrError(f"layer {key[:12]} in {self.root.path} was made by "
                           f"backend {made_by}, not {backend.name} (use --backend {made_by})")

    # --- layers: download and extraction ----------------------------------------------
    def _start_download(self, client: RegistryClient, ref: Reference,
                        layer: LayerPlan) -> SpooledBlob:
        blob, start = self.spool.get(layer.digest, layer.size)
        if start:
            blob.task = asyncio.create_task(self._download(client, ref, blob))
            blob.task.add_done_callback(retrieved)   # its error reaches users via blob.done
        return blob

    async def _download(self, client: RegistryClient, ref: Reference, blob: SpooledBlob) -> None:
        try:
            await self.spool.admit(blob)
            began = time.monotonic()
            await download(client, ref.name, blob, f"layer {blob.digest}")
            self.events.emit("download-done", digest=blob.digest, size=blob.size,
                             seconds=time.monotonic() - began)
        except BaseException as e:
            blob.done.set_exception(e if isinstance(e, Exception) else DkrError("interrupted"))
            raise
        else:
            blob.done.set_result(None)
        finally:
            blob.finish_readers()

    def _stage(self, key: str, blob: SpooledBlob, layer: LayerPlan,
               layer_format: str) -> "_Stage":
        """Start pass 1 of a staged layer now (see dkr.staging)."""
        directory = self.root.layer_tmp(key)
        directory.mkdir()
        unpacker = LayerUnpacker(None, layer_format, self.extractor_pool, stage=directory)
        task = asyncio.ensure_future(self._stage_pass(key, blob, layer, unpacker))
        task.add_done_callback(retrieved)
        # The blob stays admitted to the spool until the replay is done: what is
        # staged counts against --spool-limit as the blob did.
        return _Stage(directory, unpacker, task, f"layer {layer.digest}",
                      lambda: self.spool.release(blob, keep_partial=True))

    async def _stage_pass(self, key: str, blob: SpooledBlob, layer: LayerPlan,
                          unpacker: LayerUnpacker) -> dict:
        staged = await self._extract_spooled(blob, layer, unpacker)
        self.events.emit("layer-staged", chain_id=key, digest=layer.digest,
                         seconds=staged["busy_seconds"])
        return staged

    async def _extract_spooled(self, blob: SpooledBlob, layer: LayerPlan,
                               unpacker: LayerUnpacker) -> dict:
        await blob.entered()           # (not holding a slot meanwhile: see _SpooledFill.start)
        async with self._extractors:
            wake_fd = await unpacker.start_following(blob.path, blob.size)
            return await self._followed(blob, layer, unpacker, wake_fd)

    async def _followed(self, blob: SpooledBlob, layer: LayerPlan, unpacker: LayerUnpacker,
                        wake_fd: int) -> dict:
        """The checked report of ``unpacker``, which follows ``blob``'s spool file;
        ``wake_fd`` wakes it when the file grows."""
        label = f"layer {layer.digest}"
        blob.add_reader(wake_fd)
        report = asyncio.ensure_future(unpacker.finish())
        try:
            # A failed download also ends the reader; its own error is the one to tell.
            await asyncio.wait({blob.done, report}, return_when=asyncio.FIRST_COMPLETED)
            if failed(blob.done):
                await blob.done
            unpacked = await report
            if failed(blob.done):
                await blob.done
            if "error" in unpacked:
                raise DkrError(f"{label}: {unpacked['error']}")
            await blob.done              # the digest is checked when the last byte is in
        except BaseException:
            report.cancel()
            await unpacker.abort()
            raise
        if unpacked["diff_id"] != layer.diff_id:
            raise DkrError(f"{label}: unpacked content has DiffID {unpacked['diff_id']}, "
                           f"the config says {layer.diff_id}")
        return unpacked

    # --- the machine -----------------------------------------------------------------
    async def make_machine(self, local: str, layers: list[Path], backend: StorageBackend,
                           record: dict) -> None:
        """Make ``IMAGE_ROOT/LOCAL`` from ``layers``; ``record`` says where it came from."""
        machine = self.root.machine_path(local)
        began = time.monotonic()
        async with self._locked(f"machine-{local}", f"making machine {local}"):
            self.refuse_existing(local)
            for leftover in self.root.leftovers(f".dkr-local-{local}"):
                remove_entry(backend, leftover)
            tmp = self.root.machine_tmp(local)
            try:
                backend.create_machine(tmp, layers)
                self._put_in_place(local, tmp, layers, backend, {
                    **record, "local": local, "backend": backend.name, "created": _now()})
            except BaseException:
                if os.path.lexists(tmp):
                    backend.remove(tmp)
                raise
        self.events.emit("machine", local=local, path=str(machine),
                         seconds=time.monotonic() - began)

    def _put_in_place(self, local: str, tmp: Path, layers: list[Path],
                      backend: StorageBackend, record: dict) -> None:
        """Record the new machine ``tmp``, move it to ``IMAGE_ROOT/LOCAL``, activate it.

        A record comes first: a crash must never leave a machine that no record
        names (list and remove would not know it, gc would take its layers). If
        a step fails, the new machine goes back to ``tmp`` (the caller removes
        it), and the record is back as it was.
        """
        machine = self.root.machine_path(local)
        if os.path.lexists(machine):
            self._swap_in(local, tmp, layers, backend, record)
            return
        relative = f"machines/{local}.json"
        stale = _read_or_none(self.root.meta / relative)     # (a crash may leave one)
        self.root.write_json(relative, record)
        try:
            os.rename(tmp, machine)
            try:
                backend.activate_machine(machine, layers)
            except BaseException:
                self._swap_back(local, tmp, backend, None, None, False)
                raise
        except BaseException:
            self._put_back_record(relative, stale)
            raise

    def _swap_in(self, local: str, tmp: Path, layers: list[Path], backend: StorageBackend,
                 record: dict) -> None:
        """``_put_in_place`` over a machine already there (--force): swapped out at once,
        removed only once the new one is active.

        While two trees exist, the record also names the other tree's layers
        (swap_layers), which gc keeps until a pull or remove of LOCAL ends the
        swap. Before the exchange, and while it is undone, the record is the old
        one marked pending: a crash right after either exchange leaves the tree
        at LOCAL in doubt, and nothing must mount it from that record. An old
        machine without a usable record keeps it until the exchange: gc goes on
        refusing meanwhile, so it takes none of the old tree's layers.
        """
        machine = self.root.machine_path(local)
        old_info, unreadable = self._old_record(local)
        old = backends().get((old_info or {}).get("backend", "")) or \
            backend_on_disk(machine, self.root.path)
        relative = f"machines/{local}.json"
        old_record = _read_or_none(self.root.meta / relative)
        before = self._old_layers(local, old_info)
        if unreadable:
            log.warning("%s; replacing machine %s as found on disk.", unreadable, local)
        was_up = is_mount_point(machine)
        pending = None if before is None else {**old_info, "swap_pending": True, "swap_layers":
                                               _union(old_info.get("swap_layers", []),
                                                      record["layers"])}
        swapped = record if before is None else {**record, "swap_layers": before}
        stays = False
        if pending:
            self.root.write_json(relative, pending)
        try:
            old.deactivate_machine(machine)
            try:
                exchange_paths(tmp, machine)      # never a moment without a machine
            except BaseException:
                self._back_up(local, old, old_info, was_up)
                raise
            try:
                self.root.write_json(relative, swapped)
                backend.activate_machine(machine, layers)
            except BaseException as failure:
                if pending:
                    self.root.write_json(relative, pending)
                if self._swap_back(local, tmp, backend, old, old_info, was_up):
                    raise
                stays = True              # the new tree stays, and so does its record
                self.root.write_json(relative, swapped)
                kept = self._keep_aside(tmp, local)
                why = os_error_text(failure) if isinstance(failure, OSError) else failure
                raise DkrError(f"machine {local} could not be activated ({why}), nor the "
                               f"machine it replaced put back: that one is kept at {kept}") from None
        except BaseException:
            if not stays:
                self._put_back_record(relative, old_record)
            raise
        try:
            remove_entry(old, tmp)
        except Exception as e:         # the new machine is in place: that is the pull
            log.warning("The machine that %s replaced is left at %s (gc removes it): %s",
                        local, tmp, e)
        if before is not None:
            self.root.write_json(relative, record)

    def _put_back_record(self, relative: str, old_record: bytes | None) -> None:
        if old_record is None:
            (self.root.meta / relative).unlink(missing_ok=True)
        else:
            self.root.write_bytes(relative, old_record)

    def _old_layers(self, local: str, old_info: dict | None) -> list[str] | None:
        """What the machine a --force pull replaces may stand on: its layers, and
        those of the other tree of a swap that crashed (it may be either). None:
        its record does not say, and then it must not be mounted, or it could not
        be put back up should this pull fail."""
        layers = (old_info or {}).get("layers")
        if layers is None:
            if is_mount_point(self.root.machine_path(local)):
                raise DkrError(f"machine {local} is mounted, and its record cannot say how to "
                               "mount it again should this pull fail: unmount it, or remove "
                               f"it with 'dkr remove {local}', first")
            return None
        return _union(layers, old_info.get("swap_layers", []))

    def _swap_back(self, local: str, tmp: Path, backend: StorageBackend,
                   old: StorageBackend | None, old_info: dict | None, was_up: bool) -> bool:
        """The new machine could not be activated: it goes back to ``tmp``, and an old
        one back in place, up again if it was. False: the old one could not be."""
        machine = self.root.machine_path(local)
        try:
            backend.deactivate_machine(machine)    # in case it got that far
        except Exception as e:
            log.warning("Could not take the new machine %s down again: %s", local, e)
        if old is None:
            os.rename(machine, tmp)
            return True
        try:
            exchange_paths(tmp, machine)
        except OSError as e:
            log.warning("Could not put machine %s back in place: %s", local, e)
            return False
        self._back_up(local, old, old_info, was_up)
        return True

    def _keep_aside(self, tree: Path, local: str) -> Path:
        """Out of a temp name (which clean-ups and gc remove) to one nothing removes."""
        kept = self.root.path / f".dkr-kept-{local}-{secrets.token_hex(4)}"
        os.rename(tree, kept)
        return kept

    def _back_up(self, local: str, old: StorageBackend, old_info: dict | None,
                 was_up: bool) -> None:
        """The old machine, in place again, goes back up if it was up."""
        if was_up and (old_info or {}).get("swap_pending"):
            log.warning("Machine %s is back, but not active: a pull that stopped left its "
                        "record in doubt (pull it again with --force).", local)
            return
        try:
            if was_up and old_info is not None:
                old.activate_machine(self.root.machine_path(local),
                                     self.root.machine_layers(old_info))
        except Exception as e:     # the first failure is the one to report
            log.warning("Machine %s is back, but not active: %s", local, e)

    def _old_record(self, local: str) -> tuple[dict | None, str | None]:
        """The record of the machine a --force pull replaces, or why it cannot be
        read: that must not keep the machine (the replacement is the way out)."""
        try:
            return self.root.machine_info(local), None
        except DkrError as e:
            return None, str(e)

    # --- locks -----------------------------------------------------------------------
    def _locked(self, name: str, note: str) -> AsyncFlock:
        return AsyncFlock(self.root.meta / "locks" / f"{name}.lock", note)


# Staging a layer ahead of its parent costs ~10% more CPU in all (its members
# are written twice: into the stage, then into the tree), so it only pays
# where cores would otherwise be idle: on 2 cores, one extractor (inflating
# on one thread, writing on another) already keeps both busy, and staging
# measured no faster there (docs/bench.md).
STAGE_AHEAD_MIN_CORES = 4


def _stage_ahead(when: str) -> bool:
    if when not in ("auto", "always", "never"):
        raise DkrError(f"--stage-ahead must be auto, always or never, not {when!r}")
    if when == "auto":
        return (os.cpu_count() or 1) >= STAGE_AHEAD_MIN_CORES
    return when == "always"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class LayerFill(Protocol):
    """How ``Puller.build_layer`` fills a layer's tree."""

    async def start(self) -> None:
        """Begin what needs no tree yet: making it (a snapshot) can take a while."""

    async def fill(self, tree: Path) -> dict:
        """Fill ``tree``; the extractor's report (with ``tar_bytes``) once every
        check has passed. Takes over what ``start`` began."""

    async def close(self) -> None:
        """Let go of what ``start`` began, when the tree never came."""


class TreeFill:
    """A LayerFill that needs its tree from the start: ``fetch(tree)`` does it all."""

    def __init__(self, fetch: Callable[[Path], Awaitable[dict]]):
        self.fetch = fetch

    async def start(self) -> None:
        pass

    async def fill(self, tree: Path) -> dict:
        return await self.fetch(tree)

    async def close(self) -> None:
        pass


class _SpooledFill:
    """A v2 layer from its spooled blob: the extractor inflates while the tree is made.

    A staged layer (see dkr.staging) is replayed instead; if that has to start
    over, the blob is downloaded again.
    """

    def __init__(self, puller: Puller, layer: LayerPlan, layer_format: str,
                 take_blob: Callable[[], SpooledBlob], stage: "_Stage | None"):
        self.puller = puller
        self.layer = layer
        self.layer_format = layer_format
        self.take_blob = take_blob
        self.stage = stage
        self._ahead: tuple[SpooledBlob, LayerUnpacker] | None = None

    def _staged(self) -> bool:
        return self.stage is not None and not self.stage.used

    async def start(self) -> None:
        if self._staged():
            return
        blob = self.take_blob()
        try:
            # An extractor slot is taken only by a blob that has its room in the spool:
            # slots held by blobs waiting for room that the others cannot give up
            # before they get a slot would wait for one another for ever. A stacked
            # layer starts once its parent is done, and the spool may be full of
            # blobs that wait for it: it may pass the limit (see Spool.hurry).
            if self.layer_format == "stacked":
                self.puller.spool.hurry(blob)
            await blob.entered()
            await self.puller._extractors.acquire()
        except BaseException:
            self.puller.spool.release(blob, keep_partial=True)
            raise
        unpacker = LayerUnpacker(None, self.layer_format, self.puller.extractor_pool)
        self._ahead = (blob, unpacker)
        try:
            await unpacker.start_ahead(blob.path, blob.size)
        except BaseException:
            await to_the_end(self.close())
            raise

    async def fill(self, tree: Path) -> dict:
        if self._staged():
            return await self.stage.replay(tree)
        assert self._ahead is not None, "fill() without start()"
        (blob, unpacker), self._ahead = self._ahead, None
        try:
            return await self.puller._followed(blob, self.layer, unpacker, unpacker.into(tree))
        finally:
            self._release(blob)

    async def close(self) -> None:
        if self._ahead is not None:
            (blob, unpacker), self._ahead = self._ahead, None
            try:
                await unpacker.abort()
            finally:
                self._release(blob)

    def _release(self, blob: SpooledBlob) -> None:
        self.puller.spool.release(blob, keep_partial=True)
        self.puller._extractors.release()


@dataclass
class _Stage:
    """A stacked layer staged ahead of its parent (pass 1 running or done)."""

    directory: Path
    unpacker: LayerUnpacker
    task: asyncio.Future          # pass 1's checked report
    label: str
    release_blob: Callable[[], None] | None
    used: bool = False

    async def replay(self, tree: Path) -> dict:
        self.used = True
        try:
            staged = await self.task
            applied = await self.unpacker.replay(tree)
        finally:
            self._release()
        if "error" in applied:
            raise DkrError(f"{self.label}: {applied['error']}")
        return {**staged, **applied,
                "busy_seconds": staged["busy_seconds"] + applied["busy_seconds"]}

    async def discard(self) -> None:
        if not self.task.done():
            self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.unpacker.abort()
        self._release()
        remove_tree(self.directory)

    def _release(self) -> None:
        release, self.release_blob = self.release_blob, None
        if release is not None:
            release()


async def _parent_tree(tree: asyncio.Future, stage: _Stage | None) -> LayerTree:
    """The parent's finished tree; a staged layer that fails meanwhile fails at once.

    (Unless it is a resumed download gone wrong: the build starts that over.)
    """
    if stage is not None and not tree.done():
        await asyncio.wait({tree, stage.task}, return_when=asyncio.FIRST_COMPLETED)
        if not tree.done() and failed(stage.task) and \
                not isinstance(stage.task.exception(), ResumedBlobMismatch):
            await stage.task
    return await _outcome(tree)


def _union(first: list[str], second: list[str]) -> list[str]:
    return list(dict.fromkeys(first + second))


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _last_shared(claims: list[LayerClaim]) -> int:
    """The index of the last claim we build that another image joined, or -1."""
    return max((i for i, claim in enumerate(claims) if claim.owner and claim.sharers), default=-1)


async def _outcome(future: asyncio.Future):
    """Wait for a layer's future, which other images of a batch may wait for too:
    a task that stops waiting cancels only its own wait, not the future."""
    return await asyncio.shield(future)


async def _all_or_nothing(coroutines, spare=lambda index: False) -> list:
    """Run side by side; on the first failure cancel the rest and wait for their cleanup.

    On a failure of our own (not a cancellation), ``spare(index)`` is asked
    for each task still running: True keeps it (another image of a batch
    waits for its work, and must not fail with us).
    """
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException as e:
        ours = not isinstance(e, asyncio.CancelledError)
        for index, task in enumerate(tasks):
            if not (task.done() or (ours and spare(index))):
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
