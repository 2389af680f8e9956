"""The one exception type a user ever sees: its text is the whole error line.

Each error also has a ``kind``, a stable word a program reading ``--json`` can act
on without parsing the message: ``auth``, ``not-found``, ``network``, ``tls``,
``digest``, ``disk-full``, ``layer``, ``in-use``, ``usage``, ``policy``,
``config``, ``interrupted``, and ``other`` for the rest.
"""

import errno


class DkrError(Exception):
    """A failure to report as ``dkr: error: <message>`` with a non-zero exit."""

    exit_code = 1
    kind = "other"

    def __init__(self, *args, kind: str | None = None):
        super().__init__(*args)
        if kind:
            self.kind = kind


class UsageError(DkrError):
    """The command line asks for something that cannot be: exit 2, as argparse's own."""

    exit_code = 2
    kind = "usage"


class ConfigError(DkrError):
    """A configuration file (registries.conf, certs.d, auth.json, ...) is wrong or unreadable."""

    kind = "config"


class AuthError(DkrError):
    """The registry wants credentials dkr does not have, or refused the ones it has."""

    kind = "auth"


class NotFound(DkrError):
    """The registry has no such repository, tag, digest or blob."""

    kind = "not-found"


class DigestMismatch(DkrError):
    """Content that does not match the digest it was asked for by."""

    kind = "digest"


class LayerError(DkrError):
    """A layer's content could not be unpacked (corrupt, hostile, unsupported)."""

    kind = "layer"


class DiskFull(DkrError):
    """The image root's file system has no room left."""

    kind = "disk-full"


def reworded(error: DkrError, message: str) -> DkrError:
    """``error``'s kind and exit status with another message (e.g. with more context)."""
    new = DkrError(message, kind=error.kind)
    new.exit_code = error.exit_code
    return new


def error_kind(error: BaseException) -> str:
    """The ``kind`` of any exception a pull can end with."""
    if isinstance(error, DkrError):
        return error.kind
    if isinstance(error, OSError):
        return "disk-full" if out_of_space(error) else "other"
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return "internal"


def out_of_space(error: OSError) -> bool:
    return error.errno in (errno.ENOSPC, errno.EDQUOT)


def one_line(text: str) -> str:
    """``text`` as one line of plain characters. Messages carry what servers sent (a
    platform name, a media type, a header); a newline or a terminal escape in it
    is shown escaped, not obeyed."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def os_error_text(e: OSError) -> str:
    """A file system's refusal (full, read-only, permissions) in one line: what and where."""
    where = f": {e.filename}" if e.filename else ""
    return f"{e.strerror or e}{where}"


def os_error(e: OSError) -> DkrError:
    """``e`` as the DkrError a user sees: a full disk is of kind ``disk-full``."""
    return DkrError(os_error_text(e), kind="disk-full" if out_of_space(e) else None)


class Interrupted(DkrError):
    """The pull was stopped by a signal; exit codes follow the shell's 128+N."""

    kind = "interrupted"

    def __init__(self, signum: int):
        import signal

        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.exit_code = 128 + signum
