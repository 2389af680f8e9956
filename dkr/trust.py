"""Which certificate authorities dkr's TLS connections trust.

Left alone, libcurl trusts the system's CA bundle. A CA file the user names
(``--ca-file``) is trusted *as well*, not instead: a private registry often
sends blob downloads to storage that has a public certificate (S3, a CDN),
and its token server may have one too. ``SSL_CERT_FILE``, as for OpenSSL and
Go programs (podman, skopeo), names the bundle that stands for the system's.
"""

from __future__ import annotations

import os

from .errors import DkrError

SYSTEM_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",      # Debian, Ubuntu, Arch
    "/etc/pki/tls/certs/ca-bundle.crt",        # Fedora, RHEL
    "/etc/ssl/ca-bundle.pem",                  # openSUSE
    "/etc/ssl/cert.pem",                       # Alpine
)
MAX_BUNDLE = 16 * 1024 * 1024                  # the system's bundle is ~0.2 MB
PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


def trusted_pem(ca_file: str | None) -> bytes | None:
    """The PEM certificates every TLS connection trusts; None leaves libcurl's default.

    Raises DkrError, naming the file, if a named file cannot be read or holds
    no certificate: better said before the pull than as a handshake failure.
    """
    named_system = os.environ.get("SSL_CERT_FILE")
    if not ca_file and not named_system:
        return None
    parts = []
    if named_system:
        parts.append(_read_pem(named_system, "SSL_CERT_FILE"))
    else:
        system = next((path for path in SYSTEM_BUNDLES if os.path.isfile(path)), None)
        if system:
            parts.append(_read_pem(system, "system CA bundle"))
    if ca_file:
        parts.append(_read_pem(ca_file, "CA file"))
    return b"\n".join(parts)


def _read_pem(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BUNDLE + 1)
    except OSError as e:
        raise DkrError(f"{what} {path}: {e.strerror}") from None
    if len(data) > MAX_BUNDLE:
        raise DkrError(f"{what} {path}: larger than {MAX_BUNDLE // 1024**2} MB")
    if PEM_CERTIFICATE not in data:
        raise DkrError(f"{what} {path}: no PEM certificate in it")
    return data
