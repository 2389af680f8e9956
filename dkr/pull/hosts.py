"""The hosts a pull talks to, as the containers configuration describes them.

registries.conf says, for each image, which sources to fetch it from (its
mirrors, then the registry) and how a short name resolves; certs.d says how
to talk TLS to each host. The puller asks here, and keeps one client per
host; ``dkr.registry.sources`` goes from one source to the next.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

from dkr.errors import DkrError
from dkr.registry import registries_conf
from dkr.registry.certs import host_certs
from dkr.registry.client import RegistryClient
from dkr.registry.reference import Reference
from dkr.registry.registries_conf import PullSource
from dkr.registry.sources import SourceSet, SourceState
from dkr.registry.v2 import ImagePlan, ManifestResolver, Platform
from dkr.transport.job import TransferOptions
from dkr.transport.trust import trusted_pem

log = logging.getLogger("dkr.pull")


class Hosts:
    def __init__(self, options, transfer: TransferOptions):
        """``options``: the PullOptions; ``transfer``: the settings of a host that
        neither certs.d nor registries.conf say anything about."""
        self.options = options
        self.transfer = transfer
        self.registries = registries_conf.load(options.registries_conf)
        self.state = SourceState()        # what the run learnt about mirrors

    def candidates(self, text: str) -> list[Reference]:
        """What a user's reference stands for: a short name may stand for several,
        to try in turn."""
        return self.registries.candidates(text, terminal=self.options.choose is not None,
                                          choose=self.options.choose)

    def sources(self, ref: Reference,
                connect: Callable[[PullSource], Awaitable[RegistryClient]],
                emit: Callable[..., None]) -> SourceSet:
        return SourceSet(ref.name, self.registries.sources(ref), connect, self.state, emit)

    def transfer_for(self, endpoint: str, source: PullSource | None) -> TransferOptions:
        """The TLS settings of one host: its certs.d, and insecure from registries.conf.
        A mirror is tried once (the next source is the better retry)."""
        if source is None:
            return self.transfer
        certs = host_certs(endpoint, self.options.cert_dir)
        insecure = source.insecure or self.options.insecure
        if not (certs.directory or insecure != self.options.insecure or source.mirror):
            return self.transfer
        if certs.directory:
            log.debug("%s: certificates from %s", endpoint, certs.directory)
        retries = self.options.retries
        return TransferOptions(
            insecure=insecure,
            ca_pem=trusted_pem(self.options.ca_file, insecure, certs.ca_files),
            client_cert=certs.client_cert, client_key=certs.client_key,
            retries=min(retries, 1) if source.mirror else retries,
            low_speed_time=self.options.stall_timeout)

    async def resolve(self, refs: Reference | list[Reference] | str,
                      client: Callable[[Reference], Awaitable[SourceSet]],
                      platform: Platform | None) -> tuple[Reference, SourceSet, ImagePlan]:
        """The first of ``refs`` (a short name's candidates) whose manifest resolves;
        a reference as the user wrote it is resolved through registries.conf first."""
        text = refs if isinstance(refs, str) else None
        refs = self.candidates(text) if text is not None else \
            refs if isinstance(refs, list) else [refs]
        failures, kinds = [], set()
        for ref in refs:
            try:
                sources = await client(ref)
                plan = await ManifestResolver(sources, ref, platform).resolve()
                if text is not None:
                    self.registries.record(text)       # what the user chose at a prompt
                return ref, sources, plan
            except DkrError as e:
                if len(refs) == 1:
                    raise
                failures.append(f"{ref}: {e}")
                kinds.add(e.kind)
        raise DkrError(f"no candidate of the short name could be pulled ({'; '.join(failures)})",
                       kind=kinds.pop() if len(kinds) == 1 else None)
