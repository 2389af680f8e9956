"""Which certificate authorities dkr's TLS connections trust.

Left alone, libcurl trusts the system's CA bundle. A CA file the user names
(``--ca-file``) is trusted *as well*, not instead: a private registry often
sends blob downloads to storage that has a public certificate (S3, a CDN),
and its token server may have one too. ``SSL_CERT_FILE``, as for OpenSSL and
Go programs (podman, skopeo), names the bundle that stands for the system's.
"""

from __future__ import annotations

import logging
import os

from dkr.errors import ConfigError, DkrError

log = logging.getLogger("dkr.trust")

SYSTEM_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",                  # Debian, Ubuntu, Arch
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",   # Fedora, RHEL
    "/etc/pki/tls/certs/ca-bundle.crt",                    # older Fedora, RHEL
    "/etc/ssl/ca-bundle.pem",                              # openSUSE
    "/etc/pki/tls/cacert.pem",                             # OpenELEC
    "/etc/ssl/cert.pem",                                   # Alpine
)
MAX_BUNDLE = 16 * 1024 * 1024                  # the system's bundle is ~0.2 MB
PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


def trusted_pem(ca_file: str | None, insecure: bool = False,
                extra: tuple[str, ...] = ()) -> bytes | None:
    """The PEM certificates every TLS connection trusts; None leaves libcurl's default.

    Raises DkrError, naming the file, if ``ca_file`` cannot be read or holds no
    certificate: better said before the pull than as a handshake failure. A
    stale ``SSL_CERT_FILE`` is warned about and the system's bundle used, as Go
    programs do; with ``insecure`` nothing is verified, so it is not read.
    """
    named_system = None if insecure else os.environ.get("SSL_CERT_FILE")
    if not ca_file and not named_system and not extra:
        return None
    system = _system_pem(named_system)
    added = [_read_pem(ca_file, "CA file")] if ca_file else []
    # ``extra``: a host's own CAs (certs.d), trusted for that host as well.
    added += [_read_pem(path, "CA certificate") for path in extra]
    if not added:
        return system
    return b"\n".join(([system] if system else []) + added)


def _system_pem(named: str | None) -> bytes | None:
    if named:
        try:
            return _read_pem(named, "SSL_CERT_FILE")
        except DkrError as e:
            log.warning("%s; trusting the system's CA bundle instead.", e)
    for path in SYSTEM_BUNDLES:
        if os.path.isfile(path):
            try:
                return _read_pem(path, "system CA bundle")
            except DkrError as e:
                log.warning("%s; passed over.", e)
    return None


def _read_pem(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BUNDLE + 1)
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror}") from None
    if len(data) > MAX_BUNDLE:
        raise ConfigError(f"{what} {path}: larger than {MAX_BUNDLE // 1024**2} MB")
    if PEM_CERTIFICATE not in data:
        raise ConfigError(f"{what} {path}: no PEM certificate in it")
    return data
