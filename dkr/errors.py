"""The one exception type a user ever sees: its text is the whole error line."""


class DkrError(Exception):
    """A failure to report as ``dkr: error: <message>`` with a non-zero exit."""

    exit_code = 1


class UsageError(DkrError):
    """Options or arguments that do not go together: status 2, as argparse's own."""

    exit_code = 2
    kind = "usage"


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


class Interrupted(DkrError):
    """The pull was stopped by a signal; exit codes follow the shell's 128+N."""

    def __init__(self, signum: int):
        import signal

        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.exit_code = 128 + signum
