"""OCI distribution / Docker Registry v2: from a reference to a pull plan.

Resolves a tag or digest to one image manifest (choosing a platform from an
index), fetches and checks the config, and returns the ordered layers with
their chain ids. Everything a server says is validated before use: digests
before they become URLs or paths, media types against Content-Type, sizes and
counts against limits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import NamedTuple

from dkr.errors import DigestMismatch, DkrError, NotFound, UsageError
from dkr.registry.client import RegistryClient, status_error
from dkr.registry.reference import Reference, validate_digest

log = logging.getLogger("dkr.v2")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v1+prettyjws")
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
ACCEPT = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST]

LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar": "none",     # uncompressed, as buildah writes
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}
CONFIG_TYPES = ("application/vnd.oci.image.config.v1+json",
                "application/vnd.docker.container.image.v1+json")
MAX_LAYERS = 2048          # the seed's cap, checked before any download


class Platform(NamedTuple):
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "armv6l": "arm",
         "i686": "386", "i386": "386", "ppc64le": "ppc64le", "s390x": "s390x",
         "riscv64": "riscv64"}
_VARIANT = {"armv7l": "v7", "armv6l": "v6"}


def host_platform() -> Platform:
    machine = os.uname().machine     # what platform.machine() says, without its import
    return Platform("linux", _ARCH.get(machine, machine), _VARIANT.get(machine))


PLATFORM_TEXT_LIMIT = 64


def platform_named(os_, arch, variant=None) -> str | None:
    """OS/ARCH[/VARIANT] as an index entry or a config names it; None unless the OS
    and architecture are text. Cut short: it goes into log lines, events and
    machine records."""
    if not (isinstance(os_, str) and os_ and isinstance(arch, str) and arch):
        return None
    text = "/".join([os_, arch] + ([variant] if isinstance(variant, str) and variant else []))
    return text if len(text) <= PLATFORM_TEXT_LIMIT else text[:PLATFORM_TEXT_LIMIT] + "…"


def parse_platform(text: str) -> Platform:
    parts = text.split("/")
    if not 2 <= len(parts) <= 3 or not all(p and p.replace("_", "").isalnum() for p in parts):
        raise UsageError(f"invalid --platform {text!r}: want OS/ARCH[/VARIANT]")
    return Platform(*parts)


class LayerPlan(NamedTuple):
    digest: str          # of the blob as stored (compressed)
    size: int
    media_type: str
    diff_id: str         # of the uncompressed tar
    chain_id: str


class ImagePlan(NamedTuple):
    reference: Reference
    manifest_digest: str
    manifest: bytes
    config_digest: str
    config: bytes
    layers: list[LayerPlan]
    platform: str
    index_digest: str | None = None     # the index (manifest list) it was picked from


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI ChainID: a layer's identity including everything below it."""
    chain: list[str] = []
    for diff_id in diff_ids:
        chain.append(diff_id if not chain else sha256_digest(f"{chain[-1]} {diff_id}".encode()))
    return chain


def _json(body: bytes, what: str) -> dict:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise DkrError(f"{what}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise DkrError(f"{what}: JSON is not an object")
    return value


def _descriptor(value: object, what: str) -> tuple[str, int, str]:
    if not isinstance(value, dict):
        raise DkrError(f"{what}: descriptor is not an object")
    digest = validate_digest(value.get("digest"), what)
    size = value.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise DkrError(f"{what}: invalid size {size!r}")
    media_type = value.get("mediaType", "")
    if not isinstance(media_type, str):
        raise DkrError(f"{what}: invalid mediaType")
    return digest, size, media_type


def _variant_rank(arch: str, want: str | None, offered: str | None) -> float | None:
    """How well an entry's variant suits ours (higher is better); None: not at all.

    An arm CPU runs code built for the arm variants before its own (v7 runs v6
    and v5), as containerd's platform matcher has it.
    """
    if (offered or None) == want:
        return 2
    if not want or not offered:
        return 1
    if arch == "arm" and isinstance(offered, str) and re.fullmatch(r"v[0-9]", want) and \
            re.fullmatch(r"v[0-9]", offered) and offered < want:
        return 0.5 - (int(want[1]) - int(offered[1])) / 100
    return None


def _not_found(body: bytes) -> str:
    """What a 404 for a manifest means, from the registry's error code (the OCI
    distribution spec's NAME_UNKNOWN: no such repository)."""
    try:
        codes = {e.get("code") for e in json.loads(body).get("errors", [])}
    except (ValueError, AttributeError, TypeError):
        codes = set()
    if "NAME_UNKNOWN" in codes:
        return "no such repository (NAME_UNKNOWN)"
    return "manifest unknown (no such tag or digest)"


class ManifestResolver:
    def __init__(self, client: RegistryClient, reference: Reference, platform: Platform | None):
        self.client = client
        self.ref = reference
        self.platform = platform or host_platform()
        self.scope = f"repository:{reference.name}:pull"
        self.where = f"{reference.host}/{reference.name}"

    async def resolve(self) -> ImagePlan:
        body, media_type, digest = await self._manifest(self.ref.ref, self.ref.digest)
        chosen, from_index = None, media_type in INDEX_TYPES
        index_digest = digest if from_index else None
        if from_index:
            entry_digest, chosen = self._choose_platform(_json(body, f"{self.where}: index"))
            body, media_type, digest = await self._manifest(entry_digest, entry_digest)
            if media_type not in MANIFEST_TYPES:
                raise DkrError(f"{self.where}: index entry {entry_digest} is a {media_type}, "
                               "not an image manifest")
        manifest = _json(body, f"{self.where}: manifest {digest}")
        config_digest, config_size, config_type = _descriptor(
            manifest.get("config"), f"{self.where}: manifest config")
        if config_type and config_type not in CONFIG_TYPES:
            raise DkrError(f"{self.where}: unsupported config media type {config_type!r}")
        layers = manifest.get("layers")
        if not isinstance(layers, list):
            raise DkrError(f"{self.where}: manifest has no layers list")
        if len(layers) > MAX_LAYERS:
            raise DkrError(f"{self.where}: manifest lists {len(layers)} layers, "
                           f"more than the limit of {MAX_LAYERS}")
        descriptors = [_descriptor(layer, f"{self.where}: layer {i + 1}")
                       for i, layer in enumerate(layers)]
        for digest_, _, layer_type in descriptors:
            if layer_type not in LAYER_TYPES:
                raise DkrError(f"{self.where}: layer {digest_} has unsupported media type "
                               f"{layer_type!r}")
        config = await self._blob_payload(config_digest, config_size, "config")
        config_doc = _json(config, f"{self.where}: config")
        chosen = chosen or self._config_platform(config_doc, from_index)
        diff_ids = self._diff_ids(config_doc, len(descriptors))
        return ImagePlan(
            reference=self.ref, manifest_digest=digest, manifest=body,
            config_digest=config_digest, config=config, platform=chosen,
            index_digest=index_digest,
            layers=[LayerPlan(d, s, t, diff, chain) for (d, s, t), diff, chain
                    in zip(descriptors, diff_ids, chain_ids(diff_ids))])

    async def _manifest(self, ref: str, expected_digest: str | None) -> tuple[bytes, str, str]:
        what = f"{self.where}: manifest {ref}"
        response = await self.client.get(f"/v2/{self.ref.name}/manifests/{ref}", scope=self.scope,
                                         accept=ACCEPT, what=what)
        if response.status == 404:
            # (a digest follows the name after "@", a tag after ":")
            image = f"{self.where}{'@' if ':' in ref else ':'}{ref}"
            raise NotFound(f"{image}: {_not_found(response.body)}")
        if response.status != 200:
            raise status_error(what, response.status)
        body = response.body
        digest = sha256_digest(body)
        if expected_digest and digest != expected_digest:
            raise DigestMismatch(f"{what}: content has digest {digest}, not the requested one")
        content_type = (response.header("content-type") or "").split(";")[0].strip()
        document = _json(body, what)
        if document.get("schemaVersion") != 2:
            kind = "Docker schema1" if content_type in DOCKER_SCHEMA1 else "this"
            raise DkrError(f"{what}: {kind} manifest (schemaVersion "
                           f"{document.get('schemaVersion')!r}) is not supported")
        return body, self._media_type(document, content_type, what), digest

    def _media_type(self, document: dict, content_type: str, what: str) -> str:
        declared = document.get("mediaType")
        if declared is not None and not isinstance(declared, str):
            raise DkrError(f"{what}: invalid mediaType")
        known = MANIFEST_TYPES + INDEX_TYPES
        if declared and content_type in known and declared != content_type:
            raise DkrError(f"{what}: body says {declared} but Content-Type says {content_type}")
        media_type = declared or content_type
        if media_type in DOCKER_SCHEMA1:
            raise DkrError(f"{what}: Docker schema1 manifests are not supported")
        if not media_type:   # OCI allows omitting it: tell by shape
            media_type = OCI_INDEX if "manifests" in document else OCI_MANIFEST
        if media_type not in known:
            raise DkrError(f"{what}: unsupported manifest media type {media_type!r}")
        is_index = media_type in INDEX_TYPES
        if is_index and ("layers" in document or "config" in document) or \
                not is_index and "manifests" in document:
            raise DkrError(f"{what}: {media_type} has the fields of another kind of manifest")
        return media_type

    def _choose_platform(self, index: dict) -> tuple[str, str | None]:
        """The entry for our platform and the platform it names: an exact match, else
        one that differs only in a variant one side leaves out, else an older arm
        variant ours runs (the closest), else an image entry that names no
        platform at all (OCI makes ``platform`` optional); its config
        must then say that it fits (None: not known yet). Artifacts (an
        artifactType other than an image config: SBOMs, signatures) are no
        images; only the chosen entry's digest must be usable."""
        entries = index.get("manifests")
        if not isinstance(entries, list):
            raise DkrError(f"{self.where}: index has no manifests list")
        offered, best, best_rank = [], None, -1
        want = self.platform
        for entry in entries:
            if not isinstance(entry, dict):
                raise DkrError(f"{self.where}: index entry: descriptor is not an object")
            if entry.get("artifactType", CONFIG_TYPES[0]) not in CONFIG_TYPES or \
                    entry.get("mediaType", OCI_MANIFEST) not in MANIFEST_TYPES:
                continue
            plat = entry.get("platform")
            if not isinstance(plat, dict):
                offered.append("(no platform)")
                rank, name = 0, None
            else:
                os_, arch, variant = plat.get("os"), plat.get("architecture"), plat.get("variant")
                if os_ == "unknown" or arch == "unknown":
                    continue          # attestations and other non-images
                name = platform_named(os_, arch, variant)
                offered.append(name or "(unreadable platform)")
                rank = self._fit(os_, arch, variant)
                if rank is None:
                    continue
            if rank > best_rank:
                best, best_rank = (entry, name), rank
        if best is None:
            raise DkrError(f"{self.where}: no image for platform {want} "
                           f"(index offers: {', '.join(offered) or 'nothing'})")
        digest, _, _ = _descriptor(best[0], f"{self.where}: index entry")
        return digest, best[1]

    def _fit(self, os_, arch, variant) -> float | None:
        """How well a platform suits ours (higher is better); None: not at all."""
        if os_ != self.platform.os or arch != self.platform.architecture:
            return None
        return _variant_rank(arch, self.platform.variant, variant)

    def _config_platform(self, config: dict, from_index: bool) -> str:
        """The platform an image's config names. An index entry that named none was
        taken on the understanding that it is ours; an image pulled by its own
        manifest is what the user asked for, and is only warned about."""
        os_, arch, variant = (config.get(k) for k in ("os", "architecture", "variant"))
        found = platform_named(os_, arch, variant)
        if found is None and not from_index:
            return str(self.platform)          # the config does not say
        if self._fit(os_, arch, variant) is None:
            if from_index:
                raise DkrError(f"{self.where}: no image for platform {self.platform} (the "
                               f"index entry without a platform is {found or 'unknown'})")
            log.warning("%s: the image is for %s, not %s: it may not run here.",
                        self.where, found, self.platform)
        return found

    async def _blob_payload(self, digest: str, size: int, what: str) -> bytes:
        label = f"{self.where}: {what} {digest}"
        response = await self.client.get(f"/v2/{self.ref.name}/blobs/{digest}", scope=self.scope,
                                         expected_size=size, what=label)
        if response.status != 200:
            raise status_error(label, response.status)
        if "sha256:" + response.sha256 != digest:
            raise DigestMismatch(f"{label}: content does not match its digest")
        return response.body

    def _diff_ids(self, config: dict, count: int) -> list[str]:
        rootfs = config.get("rootfs")
        if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
            raise DkrError(f"{self.where}: config has no rootfs of type 'layers'")
        diff_ids = rootfs.get("diff_ids")
        if not isinstance(diff_ids, list) or len(diff_ids) != count:
            raise DkrError(f"{self.where}: config lists {len(diff_ids or [])} diff_ids "
                           f"for {count} layers")
        return [validate_digest(d, f"{self.where}: config diff_id") for d in diff_ids]
