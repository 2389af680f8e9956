"""A v1 pull, as systemd's import-dkr.c made one: index, tag, ancestry, then each layer
in order, streamed from the registry straight into its extractor (the protocol
itself is ``dkr.registry.v1``)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from dkr.errors import LayerError
from dkr.pull.puller import PullResult
from dkr.registry.reference import (
    Reference,
    default_machine_name,
    parse_v1_name,
    validate_machine_name,
)
from dkr.registry.v1 import FAILED, V1Session, both, index_base, layer_key, platform_of
from dkr.transport.job import Response, SinkError
from dkr.unpack.extractors import LayerUnpacker


async def pull_v1(puller, name: str, local: str | None, index_url: str) -> PullResult:
    """Pull ``NAMESPACE/REPO[:TAG]`` from a v1 index into ``IMAGE_ROOT/LOCAL``."""
    started = time.monotonic()
    repo, tag = parse_v1_name(name)
    local = validate_machine_name(local or default_machine_name(repo))
    puller.events.bind(reference=name, local=local)
    session = V1Session(puller.glue, puller.transfer,
                        index_base(index_url, puller.transfer.insecure))
    backend = await puller.backend()
    puller.refuse_existing(local)

    await session.lookup_index(repo)
    image_id = await session.resolve_tag(repo, tag)
    # No v1 image is signed: only a policy that asks for no signature lets it in.
    accepted = await puller.trust.check(None, Reference(session.registry, repo, tag, None), None)
    ancestry, (config, config_body) = await both(
        session.ancestry(image_id), session.image_json(image_id))

    reference = f"v1:{session.index}/{repo}:{tag}"
    config_digest = "sha256:" + hashlib.sha256(config_body).hexdigest()
    await puller.save_blob(config_digest, config_body)
    puller.events.emit("resolved", resolved=reference, digest=image_id,
                       platform=platform_of(config), layers=len(ancestry))
    result = PullResult(reference, local, image_id, chain=list(ancestry))
    if puller.up_to_date(local, image_id, backend):
        return puller.finish(result, started, up_to_date=True)
    keys = [layer_key(session.registry, layer_id) for layer_id in ancestry]

    paths: list[Path] = []
    for index in range(len(ancestry)):
        paths.append(await _ensure_layer(puller, session, backend, ancestry, keys, index,
                                         paths[-1] if paths else None, result))

    await puller.make_machine(local, paths, backend, {
        "reference": reference, "protocol": "v1", "index": session.index,
        "registry": session.registry, "image_id": image_id,
        "config_digest": config_digest, "ids": list(ancestry), "layers": keys,
        "accepted": accepted})
    return puller.finish(result, started)


async def _ensure_layer(puller, session: V1Session, backend, ancestry: list[str],
                        keys: list[str], index: int, parent: Path | None,
                        result: PullResult) -> Path:
    layer_id = ancestry[index]
    label = f"layer {index + 1}/{len(ancestry)} {layer_id}"
    meta = {"v1_id": layer_id, "parent": ancestry[index - 1] if index else None,
            "registry": session.registry}
    # v1 announces no sizes; "size" becomes the bytes received once known.
    announce = dict(index=index + 1, count=len(ancestry), digest=layer_id, size=0,
                    chain_id=keys[index])

    async def fetch(tree: Path) -> dict:
        unpacked, response = await _fetch_layer(puller, session, layer_id, tree,
                                                backend.layer_format, label)
        # ensure_layer reads these after fetch returns, to record and count the layer.
        meta.update(blob_sha256="sha256:" + response.sha256, diff_id=unpacked.get("diff_id"))
        announce["size"] = response.received
        return unpacked

    return await puller.ensure_layer(keys[index], parent, backend, fetch, meta, announce, result)


async def _fetch_layer(puller, session: V1Session, layer_id: str, tree: Path,
                       layer_format: str, label: str) -> tuple[dict, Response]:
    """Stream one layer into the extractor; its report once the whole tar is in."""
    unpacker = LayerUnpacker(tree, layer_format, puller.extractor_pool)
    sink = await unpacker.start()
    try:
        response = await session.layer(layer_id, sink, label)
    except SinkError:
        unpacked = await unpacker.finish()
        raise LayerError(f"{FAILED['layer']} ({label}) "
                         f"{unpacked.get('error', 'the extractor stopped reading')}",
                         kind=unpacked.get("kind")) from None
    except BaseException:
        await unpacker.abort()
        raise
    unpacked = await unpacker.finish()
    if "error" in unpacked:
        raise LayerError(f"Failed to unpack {label}: {unpacked['error']}",
                         kind=unpacked.get("kind"))
    return unpacked, response
