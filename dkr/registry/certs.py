"""containers-certs.d(5): a registry host's own CAs and client certificate.

For ``HOST[:PORT]`` the first of these directories that exists is used:
``$HOME/.config/containers/certs.d/HOST[:PORT]``,
``/etc/containers/certs.d/HOST[:PORT]``, ``/etc/docker/certs.d/HOST[:PORT]``;
``--cert-dir DIR`` (as podman's) names the one directory for every host
instead. In it, ``*.crt`` are CA certificates trusted for that host only (as
well as the system's), and ``NAME.cert`` with ``NAME.key`` is a client
certificate presented to it (mutual TLS); a certificate without its key, or
a key without its certificate, is an error, as in containers/image.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from dkr.errors import ConfigError

SYSTEM_DIRS = (Path("/etc/containers/certs.d"), Path("/etc/docker/certs.d"))
USER_DIR = Path(".config/containers/certs.d")          # below $HOME


class HostCerts(NamedTuple):
    directory: str | None
    ca_files: tuple[str, ...] = ()
    client_cert: str | None = None
    client_key: str | None = None


def cert_dirs(home: Path | None = None) -> list[Path]:
    if home is None:
        home = Path(os.environ["HOME"]) if os.environ.get("HOME") else None
    return ([home / USER_DIR] if home else []) + list(SYSTEM_DIRS)


def host_certs(host: str, cert_dir: str | None = None, home: Path | None = None) -> HostCerts:
    """What ``host``'s certs.d directory holds (nothing, if it has none)."""
    if cert_dir:
        directory = Path(cert_dir)
        if not directory.is_dir():
            raise ConfigError(f"--cert-dir {cert_dir}: not a directory")
        return read_cert_dir(directory)
    # An IPv6 host is written [::1]:5000 in a reference and a directory name alike.
    for base in cert_dirs(home):
        directory = base / host
        if directory.is_dir():
            return read_cert_dir(directory)
    return HostCerts(None)


def read_cert_dir(directory: Path) -> HostCerts:
    try:
        names = sorted(os.listdir(directory))
    except OSError as e:
        raise ConfigError(f"cannot read certificate directory {directory}: {e.strerror}") from None
    cas = tuple(str(directory / n) for n in names if n.endswith(".crt"))
    cert = key = None
    for name in names:
        if name.endswith(".cert"):
            pair = name[:-len(".cert")] + ".key"
            if pair not in names:
                raise ConfigError(f"{directory}: client certificate {name} has no key {pair} "
                               "(CA certificates take the extension .crt)")
            cert, key = str(directory / name), str(directory / pair)
        elif name.endswith(".key") and name[:-len(".key")] + ".cert" not in names:
            raise ConfigError(f"{directory}: key {name} has no client certificate "
                           f"{name[:-len('.key')]}.cert")
    return HostCerts(str(directory), cas, cert, key)
