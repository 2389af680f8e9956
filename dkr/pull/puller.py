"""Pull orchestration: from references to machines in the image root.

One ``Puller`` owns one CurlGlue (one CurlMulti for every transfer), one
registry client per host, the spool and the image root; any number of images
may be pulled through it at once. For each image it resolves a plan, claims
every layer it lacks (an flock per layer, and an in-process table so that two
images needing one layer build it once), starts all their downloads at once,
extracts each layer as soon as its bytes arrive and its parent exists (or,
staging ahead, inflates and checks it at once and replays it into the
parent's snapshot later: see dkr.staging), makes it visible by the backend's
commit (a rename, for dkr's own backends), and finally makes the machine.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Protocol

from dkr.errors import (DigestMismatch, DkrError, LayerError, UsageError, os_error_text,
                        reworded)
from dkr.events import Events
from dkr.hookspecs import StorageBackend
from dkr.plugins import backend_on_disk, choose_backend
from dkr.pull.claims import ClaimState, ClaimTable, LayerClaim, LayerTree, Share
from dkr.pull.explain import explained, free_space
from dkr.pull.hosts import Hosts
from dkr.pull.progress import Progress, short_id
from dkr.pull.spool import ResumedBlobMismatch, Spool, SpooledBlob, download
from dkr.registry.auth import Credentials
from dkr.registry.client import RegistryClient
from dkr.registry.keychain import HelperQuestion, credential_sources
from dkr.registry.reference import Reference, digest_hex, validate_machine_name
from dkr.registry.v2 import ImagePlan, LayerPlan, Platform
from dkr.store.layout import ImageRoot, remove_temps
from dkr.registry.registries_conf import PullSource
from dkr.registry.sources import SourceSet
from dkr.registry.signatures import Trust
from dkr.store.locks import AsyncFlock
from dkr.tasks import failed, retrieved, to_the_end
from dkr.transport.glue import CurlGlue
from dkr.transport.job import SinkError, TransferOptions
from dkr.transport.trust import trusted_pem
from dkr.treeops import remove_tree
from dkr.unpack.extractors import ExtractorPool, LayerUnpacker
from dkr.store import changes, imagelock, machines, nspawn, swap

log = logging.getLogger("dkr.pull")

@dataclass
class PullOptions:
    image_root: Path = Path("/var/lib/machines")
    backend: str = "auto"
    force: bool = False
    platform: Platform | None = None
    insecure: bool = False
    ca_file: str | None = None
    credentials: Credentials | None = None
    auth_file: str | None = None         # the one auth.json to read logins from (--authfile)
    jobs: int = 6
    retries: int = 4
    stall_timeout: int = 60
    spool_limit: int | None = 4 * 1024**3     # bytes of blobs downloaded ahead of extraction
    stage_ahead: str = "auto"     # stage stacked layers before their parent is done: always, never, auto
    spool_all: bool = False       # every blob whole into the spool before its extraction
    registries_conf: str | None = None   # the one registries.conf to read (else the usual files)
    cert_dir: str | None = None          # certs.d directory for every host (else per host)
    choose: Callable | None = None       # asks which of a short name's candidates to pull
    signature_policy: str | None = None   # policy.json (None: where podman looks)
    registries_d: str | None = None       # registries.d directory (None: where podman looks)
    settings: bool = True         # write IMAGE_ROOT/LOCAL.nspawn from the image's config


@dataclass
class PullResult:
    reference: str
    local: str
    manifest_digest: str
    path: str | None = None       # the machine's tree, IMAGE_ROOT/LOCAL
    index_digest: str | None = None   # of the index the manifest was picked from, if any
    layers_fetched: int = 0
    layers_reused: int = 0
    bytes_fetched: int = 0
    seconds: float = 0.0
    chain: list[str] = field(default_factory=list)
    recorded_stats: int = 0       # without root: owners kept in an xattr, not applied
    device_stand_ins: int = 0     # without root: device nodes left as marked empty files
    skipped_xattrs: int = 0       # extended attributes the file system or user may not set




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
        self.progress = Progress(self.events)    # phase and progress events
        self.spool = Spool(self.root.meta / "partial", options.spool_limit,
                           stream=not options.spool_all)
        self._clients: dict[tuple, asyncio.Future] = {}
        self.hosts = Hosts(options, self.transfer)     # registries.conf, certs.d
        self._helper_answers: dict[HelperQuestion, asyncio.Future] = {}
        self._helpers_stop = threading.Event()
        self._backend: StorageBackend | None = None
        self._layer_names: dict[str, str] = {}     # layer key -> its short id in messages
        self._claims = ClaimTable(lambda key: self._locked(
            f"layer-{key}", f"building layer {self._layer_names.get(key, key[:12])}"))
        self._extractors: asyncio.Semaphore | None = None
        self._stage_ahead = _stage_ahead(options.stage_ahead)
        self._kept: dict[str, tuple[AsyncFlock, asyncio.Future]] = {}
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
            self._release_kept()
            self.trust.close()
            if self.glue is not None:
                self.glue.close()
                self.glue = None

    # --- set-up ----------------------------------------------------------------
    async def backend(self) -> StorageBackend:
        async with self._setting_up:          # many images of a batch may ask at once
            if self._backend is None:
                self.root.prepare()
                self.extractor_pool.warm()    # starts up while the manifests come in
                self._backend, why = choose_backend(self.options.backend, self.root.path)
                self.events.emit("backend", name=self._backend.name, why=why)
        return self._backend

    async def client(self, ref: Reference) -> SourceSet:
        """``ref``'s pull sources: mirrors (registries.conf), then the registry."""
        return self.hosts.sources(ref, self.source_client, self.events.emit)

    async def source_client(self, source: PullSource) -> RegistryClient:
        """One client per host, login and TLS settings, pinged once even when many images
        ask at once. Images of a batch on one host may have different logins: an
        auth file may name a repository's namespace. --creds is for the registry
        named, never sent to a mirror: each host gets its own login."""
        ref = source.reference
        creds = (None if source.mirror else self.options.credentials) or await self._login(ref)
        key = (ref.endpoint, creds, source.insecure, source.mirror)
        if key not in self._clients:
            self._clients[key] = asyncio.ensure_future(self._connect(ref.endpoint, creds, source))
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
        for source in credential_sources(ref.host, ref.name, self.options.auth_file):
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

    async def _connect(self, endpoint: str, creds: Credentials | None,
                       source: PullSource | None = None) -> RegistryClient:
        client = RegistryClient(self.glue, endpoint, credentials=creds,
                                options=self.hosts.transfer_for(endpoint, source))
        await client.ping()
        return client

    def refuse_existing(self, local: str) -> None:
        """Before anything is fetched: a DkrError if LOCAL is a name dkr may not use.
        (Whether a machine of dkr's is replaced is told once the digest is known.)"""
        machines.refuse_foreign(self.root, local)
        if self.options.force and os.path.lexists(self.root.machine_path(local)):
            # Early, before any download: a machine that nspawn runs is refused anyway
            # (see make_machine). Not while another dkr works on it: its locks are
            # no sign of use, and make_machine waits for it.
            busy = self._locked(f"machine-{local}", "")
            if busy.try_acquire():
                try:
                    imagelock.check_not_in_use(self.root.machine_path(local),
                                               f"machine {local}", local)
                finally:
                    busy.release()

    def up_to_date(self, local: str, digest: str, backend: StorageBackend) -> bool:
        """True (and says so) if machine ``local`` holds image ``digest`` already;
        a DkrError if it holds another one and --force was not given."""
        if not machines.up_to_date(self.root, local, digest, backend.name, self.options.force):
            return False
        self.events.emit("up-to-date", local=local, digest=digest,
                         path=str(self.root.machine_path(local)))
        return True

    # --- one image ---------------------------------------------------------------
    async def pull(self, ref: Reference | str, local: str) -> PullResult:
        started = time.monotonic()
        self.events.bind(reference=str(ref), local=local)
        validate_machine_name(local)
        backend = await self.backend()
        self.refuse_existing(local)
        ref, client, plan = await self.hosts.resolve(ref, self.client, self.options.platform)
        # The manifest that is pulled (an index's picked one) is judged before any layer.
        accepted = await self.trust.check(client, ref, plan.manifest_digest)
        self.events.emit("resolved", resolved=str(ref), digest=plan.manifest_digest,
                         platform=plan.platform, layers=len(plan.layers),
                         size=sum(layer.size for layer in plan.layers),
                         index_digest=plan.index_digest)
        result = PullResult(str(ref), local, plan.manifest_digest,
                            index_digest=plan.index_digest,
                            chain=[layer.chain_id for layer in plan.layers])
        if self.up_to_date(local, plan.manifest_digest, backend):
            return self.finish(result, started, up_to_date=True)
        free_before = free_space(self.root.path)
        try:
            paths = await self._layers(client, plan, backend, result)
            await self.save_blob(plan.manifest_digest, plan.manifest)
            await self.save_blob(plan.config_digest, plan.config)
            await self.make_machine(local, paths, backend, {
                "reference": str(ref), "manifest_digest": plan.manifest_digest,
                "config_digest": plan.config_digest, "platform": plan.platform,
                **({"index_digest": plan.index_digest} if plan.index_digest else {}),
                "layers": [digest_hex(layer.chain_id) for layer in plan.layers],
                "accepted": accepted})
        except (DkrError, OSError) as e:
            self.progress.image_failed()
            raise explained(e, self.root, plan.layers, self.spool.directory,
                            free_before) from None
        return self.finish(result, started)

    def finish(self, result: PullResult, started: float, up_to_date: bool = False) -> PullResult:
        """Say what a finished pull did, including what it could not apply."""
        result.seconds = time.monotonic() - started
        result.path = str(self.root.machine_path(result.local))
        if result.recorded_stats or result.device_stand_ins:
            # (the extractor's modules stay out of here until needed)
            from dkr.unpack.extract import OVERRIDE_STAT_XATTR
            log.warning("Not running as root: file owners or modes (%d entries) and device "
                        "nodes (%d) were not applied; they are recorded in the %s xattr.",
                        result.recorded_stats, result.device_stand_ins, OVERRIDE_STAT_XATTR)
        if result.skipped_xattrs:
            log.warning("%d extended attributes (e.g. file capabilities) could not be set "
                        "here and were left out.", result.skipped_xattrs)
        self.events.emit("done", resolved=result.reference, local=result.local,
                         digest=result.manifest_digest,
                         seconds=result.seconds, fetched=result.layers_fetched,
                         reused=result.layers_reused, bytes=result.bytes_fetched,
                         up_to_date=up_to_date)
        return result

    async def _layers(self, client: RegistryClient, plan: ImagePlan, backend: StorageBackend,
                      result: PullResult) -> list[Path]:
        """Every layer of ``plan``, built or reused, base first."""
        claims: list[Share] = []
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
            if claim.builds and claim.key not in prefetched:
                prefetched[claim.key] = self._start_download(client, plan.reference, layer)
        # All layers go at once: a stacked one waits for its parent's tree (not its
        # commit) to snapshot it, and commits only after its parent did.
        return await _all_or_nothing([
            self._v2_build(claim, index, plan, backend, client, prefetched, result,
                           claims[index - 1] if index else None)
            for index, claim in enumerate(claims)],
            spare=lambda index: self._still_shared(claims[index]))

    async def _v2_build(self, claim: Share, index: int, plan: ImagePlan,
                        backend: StorageBackend, client: RegistryClient,
                        prefetched: dict[str, SpooledBlob], result: PullResult,
                        parent: Share | None) -> Path:
        layer = plan.layers[index]
        meta = {"chain_id": layer.chain_id, "diff_id": layer.diff_id, "digest": layer.digest,
                "size": layer.size, "media_type": layer.media_type,
                "parent": plan.layers[index - 1].chain_id if index else None}
        announce = dict(index=index + 1, count=len(plan.layers), digest=layer.digest,
                        size=layer.size, chain_id=layer.chain_id)

        def take_blob() -> SpooledBlob:
            return prefetched.pop(claim.key, None) or \
                self._start_download(client, plan.reference, layer)

        if not claim.builds:
            return await self.progress.shared(layer.digest, layer.size, _outcome(claim.future))
        await self._remove_leftovers(claim.key, backend)
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

    # --- what gc must leave alone ----------------------------------------------------
    async def keep(self, name: str) -> None:
        """Hold ``keep-<name>.lock`` shared until this run ends (``layer-<key>``,
        ``blob-<hex>``): taken before the pull looks whether the layer or blob is
        there, so that what it finds stays until its machine's record names it.
        gc removes a layer or blob only holding that lock exclusively (see
        dkr.manage); it never waits for it, and a pull waits only while gc
        removes that one entry."""
        if name not in self._kept:
            lock = AsyncFlock(self.root.meta / "locks" / f"keep-{name}.lock",
                              f"removing {name[:18]} (gc)", shared=True)
            taking = asyncio.ensure_future(lock.acquire())
            taking.add_done_callback(retrieved)
            self._kept[name] = (lock, taking)
        await asyncio.shield(self._kept[name][1])

    def _release_kept(self) -> None:
        for lock, taking in self._kept.values():
            taking.cancel()
            lock.release()
        self._kept.clear()

    async def save_blob(self, digest: str, data: bytes) -> None:
        await self.keep(f"blob-{digest_hex(digest)}")
        self.root.save_blob(digest, data)

    # --- layers: claim, build -------------------------------------------------------
    async def claim_layer(self, key: str, backend: StorageBackend, result: PullResult,
                          digest: str = "") -> Share:
        """Reuse layer ``key``, share its build with another image, or take it on
        (see dkr.claims: the order in which layers are claimed, and why)."""
        # (kept from gc from before we look for it: see keep())
        await self.keep(f"layer-{key}")
        self._layer_names.setdefault(key, short_id(digest or key))

        def found() -> Path | None:
            final = self.root.layer_path(key)
            if not final.exists():
                return None
            self._check_layer_backend(key, backend)
            return final

        share = await self._claims.claim(key, found)
        if share.mine and share.claim.state is ClaimState.DONE:
            self.progress.emit("skipped", digest or key, key)
            result.layers_reused += 1
        return share

    async def build_layer(self, claim: Share, parent: LayerTree | None,
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
            self.progress.emit("layer-start", announce["digest"], claim.key, **announce)
            for last_try in (False, True):
                tmp = self.root.layer_tmp(claim.key)
                await fill.start()
                began = time.monotonic()
                try:
                    backend.create_layer(self.root.path, claim.key, tmp, parent and parent.path)
                except BaseException:
                    await to_the_end(fill.close())
                    raise
                try:
                    prepared = time.monotonic()
                    unpacked = await fill.fill(tmp)
                    extracted = time.monotonic()
                    claim.claim.extracted(tmp)
                    self.progress.emit("layer-extracted", announce["digest"], claim.key)
                    await self._seal(backend, tmp, claim.key, meta, unpacked)
                    sealed = time.monotonic()
                    if parent_committed is not None:
                        await _outcome(parent_committed)
                    claim.claim.commit(final, functools.partial(backend.commit_layer,
                                                                self.root.path, claim.key))
                    break
                except ResumedBlobMismatch as e:
                    self._unmake(backend, tmp, claim.key)
                    if last_try:
                        raise reworded(e, str(e)) from None
                    log.warning("%s; starting this layer over.", e)
                except BaseException:
                    self._unmake(backend, tmp, claim.key)
                    raise
        except BaseException as e:
            self._abandon(claim, e)
            raise
        result.layers_fetched += 1
        result.bytes_fetched += announce.get("size") or 0
        result.recorded_stats += unpacked.get("recorded_owners", 0)
        result.device_stand_ins += unpacked.get("skipped_devices", 0)
        result.skipped_xattrs += unpacked.get("skipped_xattrs", 0)
        self.progress.emit("layer-done", announce["digest"], claim.key,
                         size=announce.get("size") or 0, tar_bytes=unpacked["tar_bytes"],
                         prepare_seconds=prepared - began,
                         extract_seconds=unpacked.get("busy_seconds", extracted - prepared),
                         commit_seconds=sealed - extracted)
        return final

    def _unmake(self, backend: StorageBackend, tmp: Path, key: str) -> None:
        """A layer that will not be committed: its tree goes, and its record with it
        (written just before the commit), so that no record names a missing tree."""
        backend.remove_layer(self.root.path, key, tmp)
        (self.root.meta / "layers" / f"{key}.json").unlink(missing_ok=True)

    async def _remove_leftovers(self, key: str, backend: StorageBackend) -> None:
        """What an interrupted pull left of a layer we hold the lock of."""
        for leftover in self.root.leftovers(self.root.layer_path(key).name):
            log.info("Removing %s left by an interrupted pull.", leftover.name)
            await remove_leftover(functools.partial(backend.remove_layer, self.root.path, key),
                                  leftover)
        remove_temps(self.root.meta / "layers", f"{key}.json")

    async def _seal(self, backend: StorageBackend, tree: Path, key: str, meta: dict,
                    unpacked: dict) -> None:
        """Seal and record a layer, off the event loop: both wait for its data to reach disk."""
        loop = asyncio.get_running_loop()
        sealed = await self.extractor_pool.run_job({"seal": str(tree), "backend": backend.name,
                                                    "image_root": str(self.root.path),
                                                    "key": key})
        if sealed.get("unknown"):     # a backend only this process knows (registered by hand)
            await loop.run_in_executor(None, backend.seal_layer, self.root.path, key, tree)
        elif "error" in sealed:
            raise LayerError(sealed["error"], kind=sealed.get("kind"))
        # To its end even when cancelled: the thread would write on regardless, after
        # the caller has removed what a failure leaves.
        await to_the_end(loop.run_in_executor(None, self.root.write_json, f"layers/{key}.json", {
            **meta, "backend": backend.name, "tar_bytes": unpacked["tar_bytes"],
            "created": _now()}))

    async def ensure_layer(self, key: str, parent: Path | None, backend: StorageBackend,
                           fetch: Callable[[Path], Awaitable[dict]], meta: dict,
                           announce: dict, result: PullResult) -> Path:
        """Claim and, if needed, build one layer: the sequential form (v1 uses it)."""
        claim = await self.claim_layer(key, backend, result, announce.get("digest", key))
        if not claim.builds:
            return await _outcome(claim.future)
        await self._remove_leftovers(key, backend)
        return await self.build_layer(claim, parent and LayerTree(parent), backend,
                                      TreeFill(fetch), meta, announce, result)

    def _still_shared(self, share: Share) -> bool:
        """Our image failed: go on building ``share`` if another image waits for it,
        else let no other image join its build from now on (it is about to stop)."""
        if share.claim.sharers:
            return True
        self._claims.forget(share.claim)
        return False

    def _abandon(self, share: Share, error: BaseException | None = None) -> None:
        """Release what an image's claim holds; a layer never built fails its waiters."""
        if share.mine:                # else its maker decides how it ends
            self._claims.abandon(share.claim, error)

    def _check_layer_backend(self, key: str, backend: StorageBackend) -> None:
        info = self.root.layer_info(key) or {}
        made_by = info.get("backend", backend.name)
        if made_by != backend.name:
            name = self._layer_names.get(key, key[:12])
            raise DkrError(f"layer {name} in {self.root.path} was made by backend {made_by}, "
                           f"not {backend.name} (use --backend {made_by})")

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
            await self.progress.admit(self.spool, blob)
            began = time.monotonic()
            await download(client, ref.name, blob, f"layer {blob.digest}")
            await blob.sink.end()          # its extractor has every byte: EOF
            self.progress.emit("download-done", blob.digest, size=blob.size,
                               seconds=time.monotonic() - began, spooled=blob.sink.spooled,
                               pauses=blob.sink.pauses)
        except BaseException as e:
            blob.sink.close_pipe()
            blob.done.set_exception(e if isinstance(e, Exception) else DkrError("interrupted"))
            raise
        else:
            blob.done.set_result(None)
        finally:
            self.spool.finished(blob)

    def _stage(self, key: str, blob: SpooledBlob, layer: LayerPlan,
               layer_format: str) -> "_Stage":
        """Start pass 1 of a staged layer now (see dkr.staging)."""
        directory = self.root.layer_tmp(key)
        directory.mkdir()
        self.progress.staging(layer.digest)
        unpacker = LayerUnpacker(None, layer_format, self.extractor_pool, stage=directory)
        task = asyncio.ensure_future(self._stage_pass(key, blob, layer, unpacker))
        task.add_done_callback(retrieved)
        # The blob is held until the replay is done: what is staged counts
        # against --spool-limit as the blob did.
        return _Stage(directory, unpacker, task, f"layer {layer.digest}",
                      lambda: self.spool.need(blob),
                      lambda: self.spool.release(blob, keep_partial=True))

    async def _stage_pass(self, key: str, blob: SpooledBlob, layer: LayerPlan,
                          unpacker: LayerUnpacker) -> dict:
        staged = await self._extract_spooled(blob, layer, unpacker)
        self.progress.emit("layer-staged", layer.digest, key,
                         seconds=staged["busy_seconds"])
        return staged

    async def _extract_spooled(self, blob: SpooledBlob, layer: LayerPlan,
                               unpacker: LayerUnpacker) -> dict:
        # A stage is ahead of need: its blob comes in its turn, not before the
        # layers below it (until the replay needs it: see _Stage.replay).
        await self.spool.started(blob)
        async with self._extractors:
            await unpacker.take()
            return await self._streamed(blob, layer, unpacker,
                                        lambda prefix: unpacker.stream(blob.path, blob.size,
                                                                       prefix))

    async def _streamed(self, blob: SpooledBlob, layer: LayerPlan, unpacker: LayerUnpacker,
                        start: Callable[[int], int]) -> dict:
        """The checked report of ``unpacker``, started by ``start(prefix)`` on what is
        spooled of ``blob`` and fed the rest by its download (see SpooledBlob.hand_over)."""
        label = f"layer {layer.digest}"
        report = None
        try:
            await blob.hand_over(start)
            report = asyncio.ensure_future(unpacker.finish())
            # A failed download also ends the reader; its own error is the one to tell.
            # A reader that failed (a full disk, a bad member) ends the download (its
            # pipe breaks): then the reader's error is.
            await asyncio.wait({blob.done, report}, return_when=asyncio.FIRST_COMPLETED)
            if _failed_by_itself(blob.done):
                await blob.done
            unpacked = await report
            if _failed_by_itself(blob.done):
                await blob.done
            if "error" in unpacked:
                raise LayerError(f"{label}: {unpacked['error']}", kind=unpacked.get("kind"))
            await blob.done              # the digest is checked when the last byte is in
        except BaseException:
            if report is not None:
                report.cancel()
            await unpacker.abort()
            raise
        if unpacked["diff_id"] != layer.diff_id:
            raise DigestMismatch(f"{label}: unpacked content has DiffID {unpacked['diff_id']}, "
                                 f"the config says {layer.diff_id}")
        return unpacked

    # --- the machine -----------------------------------------------------------------
    async def make_machine(self, local: str, layers: list[Path], backend: StorageBackend,
                           record: dict) -> None:
        """Make ``IMAGE_ROOT/LOCAL`` from ``layers``; ``record`` says where it came from."""
        machine = self.root.machine_path(local)
        began = time.monotonic()
        async with self._locked(f"machine-{local}", f"making machine {local}"):
            if not swap.recover(self.root, local) and self.options.force:
                raise DkrError(f"machine {local}: the machine an earlier pull replaced is "
                               "still in use (see the warning); stop what runs in it first")
            if self.up_to_date(local, machines.image_digest(record), backend):
                return            # another pull made it meanwhile
            replaced = machines.held(self.root, local)
            # systemd's locks, until the machine is in place: nspawn cannot start on
            # it half replaced, and one running in it keeps it.
            with imagelock.ImageLock(machine, f"machine {local}", local):
                discarded = self._changes_to_discard(local, replaced)
                await self._place_machine(local, layers, backend, record)
        self.events.emit("machine", local=local, path=str(machine),
                         seconds=time.monotonic() - began,
                         digest=machines.image_digest(record),
                         index_digest=record.get("index_digest"),
                         replaced=(replaced.digest or "an unknown image") if replaced else None,
                         discarded=discarded)

    def _changes_to_discard(self, local: str, replaced: machines.Held | None) -> bool:
        """Warn, before --force replaces machine ``local``, of the changes made in it."""
        if replaced is None:
            return False
        found = changes.changed_paths(self.root.path, local, replaced.record or {})
        if found:
            log.warning("Machine %s was changed since it was made (%s); replacing it "
                        "discards those changes.", local, changes.describe(found))
        elif found is None:
            log.warning("Whether machine %s was changed since it was made cannot be told; "
                        "replacing it discards any changes.", local)
        return bool(found)

    async def _place_machine(self, local: str, layers: list[Path], backend: StorageBackend,
                             record: dict) -> None:
        machine = self.root.machine_path(local)
        for leftover in self.root.leftovers(f".dkr-local-{local}"):
            # (taken down too: a killed --force may leave one mounted)
            # (by the backend that made it, which an earlier pull may have chosen)
            made_by = backend_on_disk(leftover, self.root.path, default=backend)
            await remove_leftover(functools.partial(swap.take_away, self.root, local, made_by),
                                  leftover)
        remove_temps(self.root.meta / "machines", f"{local}.json")
        tmp = self.root.machine_tmp(local)
        try:
            backend.create_machine(self.root.path, local, tmp, layers)
        except BaseException:
            if os.path.lexists(tmp):
                backend.remove_machine(self.root.path, local, tmp)
            raise
        # From here on the swap or placement owns tmp (after an exchange it is the old tree).
        # ("made": what changed in the tree after it is a change of the user's, see
        # dkr.store.changes)
        record.update(local=local, backend=backend.name, created=_now(), made=time.time())
        if os.path.lexists(machine):
            swap.MachineSwap(self.root, local).run(tmp, layers, backend, record)
        else:
            swap.place(self.root, local, tmp, layers, backend, record)
        # Right after the tree, still under the machine's locks (nspawn cannot start
        # meanwhile); not before it: a swap that is killed and rolled back must not
        # leave the new image's settings beside the old machine.
        if not nspawn.put(self.root.path, local, self._settings(local, record)):
            log.warning("%s was not written by dkr: left as it is, without the image's "
                        "settings.", nspawn.settings_path(self.root.path, local))

    def _settings(self, local: str, record: dict):
        """LOCAL.nspawn from the image's config, prepared to go in place with the
        machine (None: the machine gets none); what does not reach nspawn is said."""
        nspawn.remove_leftovers(self.root.path, local)
        config = self.root.read_blob(record.get("config_digest") or "") \
            if record.get("config_digest") else None
        if not self.options.settings or config is None:
            return None
        try:
            text, warnings = nspawn.settings(json.loads(config))
        except (ValueError, AttributeError):
            log.warning("Machine %s: the image's config is no JSON object; no %s.nspawn "
                        "written.", local, local)
            return None
        for warning in warnings:
            log.warning("Machine %s: %s.", local, warning)
        try:
            return nspawn.prepare(self.root.path, local, text)
        except OSError as e:        # (the machine is in place: it stays, without them)
            log.warning("Machine %s: cannot write its settings %s: %s.", local,
                        nspawn.settings_path(self.root.path, local), os_error_text(e))
            return None

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
        raise UsageError(f"--stage-ahead must be auto, always or never, not {when!r}")
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
    """A v2 layer from its blob: the extractor starts on what is spooled while the
    tree is made, then takes the rest of the download from its pipe.

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
            self.puller.spool.need(blob)   # (it may wait for an extractor meanwhile)
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
            return await self.puller._streamed(blob, self.layer, unpacker,
                                               lambda prefix: unpacker.into(tree, prefix))
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
    need_blob: Callable[[], None]
    release_blob: Callable[[], None] | None
    used: bool = False

    async def replay(self, tree: Path) -> dict:
        self.used = True
        self.need_blob()              # pass 1 may still wait for its bytes: they are due now
        try:
            staged = await self.task
            applied = await self.unpacker.replay(tree)
        finally:
            self._release()
        if "error" in applied:
            raise LayerError(f"{self.label}: {applied['error']}", kind=applied.get("kind"))
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


# Seconds between tries to remove a leftover temp tree (see remove_leftover).
LEFTOVER_RETRIES = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)


async def remove_leftover(remove: Callable[[Path], None], leftover: Path) -> None:
    """Remove a temp tree that a run which is gone left, under the lock it held.

    The lock went with that run's process; its helpers die a moment later, by
    their death signal, and one may still be writing into the tree meanwhile:
    a removal that fails is tried again. If it still fails, the tree is left
    for gc: ours has a name of its own, so the leftover is never in our way.
    (What ``remove`` refuses outright, a DkrError, still stops us.)
    """
    for delay in (*LEFTOVER_RETRIES, None):
        try:
            remove(leftover)
            return
        except OSError as e:
            if delay is None:
                log.warning("Could not remove %s, left by an interrupted pull (gc will): %s",
                            leftover.name, os_error_text(e))
                return
        await asyncio.sleep(delay)


def _failed_by_itself(download: asyncio.Future) -> bool:
    """Whether a download failed, other than because its extractor stopped reading."""
    return failed(download) and (download.cancelled() or
                                 not isinstance(download.exception(), SinkError))


def _last_shared(claims: list[Share]) -> int:
    """The index of the last claim we made that another image joined, or -1."""
    return max((i for i, share in enumerate(claims) if share.mine and share.claim.sharers),
               default=-1)


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
