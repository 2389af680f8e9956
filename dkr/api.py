"""The Python API: ``dkr.api.pull()`` and its coroutine twin ``pull_async()``.

The CLI is a thin layer over these; other programs may call them directly,
from plain code or from a running asyncio loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from pathlib import Path

from dkr.errors import DkrError, Interrupted, UsageError, error_kind, os_error, os_error_text
from dkr.events import Events
from dkr.pull.puller import Puller, PullOptions, PullResult
from dkr.registry.auth import Credentials
from dkr.registry.reference import default_machine_name, parse_reference
from dkr.registry.v2 import Platform, parse_platform

__all__ = ["PullOptions", "PullResult", "login", "logout", "pull", "pull_async", "pull_batch",
           "pull_batch_async", "pull_v1", "pull_v1_async", "report_error"]


async def pull_async(reference: str, local: str | None = None, *,
                     options: PullOptions | None = None,
                     events: Events | None = None) -> PullResult:
    ref = parse_reference(reference)
    local = local or default_machine_name(ref.name)
    async with Puller(_usable(options), events) as puller:
        # A short name is resolved by the puller (registries.conf); LOCAL is named
        # after what the user wrote.
        return await puller.pull(reference, local)


def pull(reference: str, local: str | None = None, *, options: PullOptions | None = None,
         events: Events | None = None) -> PullResult:
    """Pull one image; raises DkrError (or Interrupted on SIGINT/SIGTERM)."""
    return _run(pull_async(reference, local, options=options, events=events))


async def pull_batch_async(items: list[tuple[str, str | None]], *,
                           options: PullOptions | None = None,
                           events: Events | None = None) -> list[PullResult | DkrError]:
    """Pull several images at once over one engine; each succeeds or fails on its own.

    Layers the images share are fetched and unpacked once. Returns, in order,
    a PullResult or the DkrError of each image; each failure is told as it
    happens by an ``error`` event (with the image's ``local``).
    """
    parsed = []
    seen: dict[str, str] = {}
    for reference, local in items:
        ref = parse_reference(reference)
        local = local or default_machine_name(ref.name)
        if local in seen:
            raise UsageError(f"machine name {local!r} is used for both {seen[local]} "
                             f"and {reference}")
        seen[local] = reference
        parsed.append((reference, local))
    hosts = sorted({parse_reference(reference).endpoint for reference, _ in parsed})
    if options is not None and options.credentials and len(hosts) > 1:
        raise UsageError(f"--creds would go to every registry of the batch ({', '.join(hosts)}): "
                       "put each one's login in ~/.docker/config.json instead")
    events = events or Events()

    async def pull_one(puller: Puller, reference: str, local: str):
        try:
            return await puller.pull(reference, local)
        except (DkrError, OSError) as e:
            # A file system's refusal is that image's failure, as any other of its errors;
            # it is told as it happens, while the others go on.
            error = os_error(e) if isinstance(e, OSError) else e
            report_error(events, reference, error, local)
            return error

    async with Puller(_usable(options), events) as puller:
        outcomes = await asyncio.gather(*(pull_one(puller, ref, local) for ref, local in parsed),
                                        return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException) and not isinstance(outcome, DkrError):
            raise outcome
    return outcomes


def pull_batch(items: list[tuple[str, str | None]], *, options: PullOptions | None = None,
               events: Events | None = None) -> list[PullResult | DkrError]:
    return _run(pull_batch_async(items, options=options, events=events))


def _usable(options: PullOptions | None) -> PullOptions:
    """``options`` with what callers pass in their own words made the engine's types:
    a platform as "linux/arm64", credentials as a (user, password) pair, paths as
    str. A TypeError names the type wanted."""
    options = options or PullOptions()
    changes = {}
    if isinstance(options.platform, str):
        changes["platform"] = parse_platform(options.platform)
    elif options.platform is not None and not isinstance(options.platform, Platform):
        raise TypeError("PullOptions.platform: want a str such as 'linux/arm64' or a "
                        f"dkr.registry.v2.Platform, not {type(options.platform).__name__}")
    credentials = options.credentials
    if isinstance(credentials, (tuple, list)) and not isinstance(credentials, Credentials):
        if len(credentials) != 2 or not all(isinstance(part, str) for part in credentials):
            raise TypeError("PullOptions.credentials: want a (user, password) pair of str")
        changes["credentials"] = Credentials(*credentials)
    elif credentials is not None and not isinstance(credentials, Credentials):
        raise TypeError("PullOptions.credentials: want a (user, password) tuple or a "
                        f"dkr.registry.auth.Credentials, not {type(credentials).__name__}")
    if not isinstance(options.image_root, Path):
        if not isinstance(options.image_root, str):
            raise TypeError("PullOptions.image_root: want a str or pathlib.Path, not "
                            f"{type(options.image_root).__name__}")
        changes["image_root"] = Path(options.image_root)
    return dataclasses.replace(options, **changes) if changes else options


def report_error(events: Events, reference: str | None, error: Exception,
                 local: str | None) -> None:
    """Emit the ``error`` event of a failed pull (of one image, or of a whole command when
    ``local`` is None). If the reader of the events is gone (a closed pipe), the
    error is still told by whoever raises it: the event must not replace it."""
    message = os_error_text(error) if isinstance(error, OSError) else str(error)
    try:
        events.emit("error", reference=reference, local=local, message=message,
                    kind=error_kind(error))
    except BrokenPipeError:
        pass


def about_image(reference: str, error: Exception | str) -> str:
    """``error``'s message for one image of a batch: led by ``reference``, unless it
    already names that image's repository (most do, as HOST/NAME)."""
    message = str(error)
    try:
        ref = parse_reference(reference)
    except DkrError:
        return f"{reference}: {message}"
    if message.startswith((reference, f"{ref.host}/{ref.name}")):
        return message
    return f"{reference}: {message}"


def read_batch_file(text: str, where: str) -> list[tuple[str, str | None]]:
    """``REFERENCE [LOCAL]`` per line; blank lines and ``#`` comments are skipped."""
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) > 2:
            raise UsageError(f"{where} line {number}: want REFERENCE [LOCAL], got {line.strip()!r}")
        items.append((words[0], words[1] if len(words) == 2 else None))
    if not items:
        raise UsageError(f"{where}: no images listed")
    return items


async def pull_v1_async(name: str, local: str | None = None, *, index_url: str,
                        options: PullOptions | None = None,
                        events: Events | None = None) -> PullResult:
    """Pull ``NAMESPACE/REPO[:TAG]`` over the Docker Registry v1 protocol."""
    from dkr.pull.v1 import pull_v1 as _pull_v1
    async with Puller(_usable(options), events) as puller:
        return await _pull_v1(puller, name, local, index_url)


def pull_v1(name: str, local: str | None = None, *, index_url: str,
            options: PullOptions | None = None, events: Events | None = None) -> PullResult:
    return _run(pull_v1_async(name, local, index_url=index_url, options=options, events=events))


def login(registry: str, credentials, *, authfile: str | None = None,
          cert_dir: str | None = None, insecure: bool | None = None,
          registries_conf: str | None = None) -> str:
    """Check ``credentials`` (``registry.auth.Credentials``) against ``registry`` and store
    them in podman's auth.json; returns the file's path. ``insecure`` None: as
    registries.conf says for the host."""
    from dkr.registry import login as logins
    from dkr.registry import registries_conf as conf
    from dkr.registry.certs import host_certs
    from dkr.transport.job import TransferOptions
    from dkr.transport.trust import trusted_pem

    key = logins.login_key(registry)
    host = key.split("/", 1)[0]
    if insecure is None:
        insecure = conf.load(registries_conf).insecure(host)
    certs = host_certs(host, cert_dir)
    options = TransferOptions(insecure=insecure, ca_pem=trusted_pem(None, insecure, certs.ca_files),
                              client_cert=certs.client_cert, client_key=certs.client_key)
    path = logins.auth_file(authfile)
    _run(logins.check_login(key, credentials, options))
    logins.store_login(path, key, credentials)
    return str(path)


def logout(registry: str | None, *, authfile: str | None = None) -> str:
    """Remove the login for ``registry`` (None: all of them) from podman's auth.json."""
    from dkr.registry import login as logins

    path = logins.auth_file(authfile)
    logins.remove_login(path, logins.login_key(registry) if registry is not None else None)
    return str(path)


def _run(coro):
    """Run ``coro``; SIGINT and SIGTERM cancel it so every cleanup path runs."""
    async def main():
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        received: list[int] = []

        def stop(signum: int) -> None:
            received.append(signum)
            task.cancel()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop, signum)
        try:
            return await coro
        except asyncio.CancelledError:
            if received:
                raise Interrupted(received[0]) from None
            raise
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)

    try:
        return asyncio.run(main())
    except DkrError:
        raise
