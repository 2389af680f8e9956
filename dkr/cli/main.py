"""The ``dkr`` command line: a thin layer over ``dkr.api``."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import select
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dkr import __version__, api
from dkr.cli import login, manage
from dkr.cli.render import JsonRenderer, LogLines, PlainProgress, StatsRenderer
from dkr.errors import DkrError, one_line, os_error_text
from dkr.events import Events, bound_fields
from dkr.registry.auth import parse_creds
from dkr.registry.reference import default_machine_name, parse_reference
from dkr.registry.v2 import parse_platform

if TYPE_CHECKING:
    from dkr.cli.progress_view import LiveView

DEFAULT_IMAGE_ROOT = "/var/lib/machines"
# Upper bounds: libcurl takes these as C longs, and nothing sensible needs more.
MAX_JOBS = 1024
MAX_RETRIES = 1000
MAX_STALL = 7 * 24 * 3600


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's, sized to the terminal once per process.

    argparse makes a formatter for every argument it is given, and each
    asked ``shutil`` for the terminal's size: importing it (with bz2 and
    lzma) cost every start of dkr ~4 ms before its first request.
    """

    def __init__(self, prog: str):
        super().__init__(prog, width=_terminal_columns() - 2)


@functools.cache
def _terminal_columns() -> int:
    """What ``shutil.get_terminal_size().columns`` says: $COLUMNS, the terminal, or 80."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns > 0:
        return columns
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 80


class _Parser(argparse.ArgumentParser):
    """Usage errors, too, are one ``dkr: error:`` line."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"dkr: error: {message} (see '{self.prog} --help')\n")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-root", default=DEFAULT_IMAGE_ROOT, type=Path,
                        help=f"where layers and machines live (default {DEFAULT_IMAGE_ROOT})")
    parser.add_argument("-v", "--verbose", action="store_true", help="say more")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dkr", description="Pull container images into ready root file systems.")
    parser.add_argument("--version", action="version", version=f"dkr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    pull = sub.add_parser("pull", help="pull an image and make a machine from it")
    _common(pull)
    pull.add_argument("--backend", default="auto", help="auto, btrfs, overlay, dir or a plugin's")
    pull.add_argument("--force", action="store_true",
                      help="replace a machine that holds another image, "
                           "discarding changes made in it, in one step: its path never shows "
                           "an empty or half tree. Without it, a machine that already holds "
                           "the image is left as it is (exit 0), one that holds another is "
                           "an error. A tree dkr did not make is never replaced")
    pull.add_argument("--no-settings", dest="settings", action="store_false",
                      help="write no IMAGE_ROOT/LOCAL.nspawn from the image's config")
    pull.add_argument("--platform", type=_platform_arg, help="OS/ARCH[/VARIANT] to pick from an index")
    pull.add_argument("--insecure", action="store_true",
                      help="allow plain HTTP and unverified TLS for this registry")
    pull.add_argument("--ca-file", help="PEM file of CA certificates to trust")
    pull.add_argument("--creds", type=_creds_arg, help="USER:PASS for the registry")
    pull.add_argument("--registries-conf", metavar="FILE",
                      help="read this containers-registries.conf(5) file only (mirrors, "
                           "short names; default: /etc/containers/registries.conf and "
                           "registries.conf.d, or $CONTAINERS_REGISTRIES_CONF)")
    pull.add_argument("--cert-dir", metavar="DIR",
                      help="TLS files for the registries (*.crt CAs, *.cert/*.key client "
                           "pair) instead of the certs.d directories")
    pull.add_argument("--jobs", type=int, default=6, help="connections per host (default 6)")
    pull.add_argument("--retries", type=int, default=4,
                      help="further attempts after a network failure, 429 or 5xx (default 4)")
    pull.add_argument("--spool-limit", type=_size_arg, default=4 * 1024**3, metavar="SIZE",
                      help="download at most this much ahead of extraction, e.g. 500M "
                           "(default 4G; the next layer's blob is always let through)")
    pull.add_argument("--stall-timeout", type=int, default=60, metavar="SECONDS",
                      help="give up on a transfer that moved no data this long (default 60)")
    pull.add_argument("--stage-ahead", choices=("auto", "always", "never"), default="auto",
                      help="inflate and check btrfs/dir layers while their parent is still "
                           "being built, to replay them once it is done (auto: with 4 or more "
                           "cores, where that is faster)")
    pull.add_argument("--signature-policy", metavar="FILE",
                      help="trust policy (default: ~/.config/containers/policy.json, else "
                           "/etc/containers/policy.json)")
    pull.add_argument("--registries.d", dest="registries_d", metavar="DIR",
                      help="where signatures are kept (default: ~/.config/containers/"
                           "registries.d and /etc/containers/registries.d)")
    pull.add_argument("--json", action="store_true", help="print events as JSON lines on stdout")
    pull.add_argument("--v1", action="store_true",
                      help="use the Docker Registry v1 protocol (REFERENCE is NAMESPACE/REPO[:TAG])")
    pull.add_argument("--index-url", help="v1 index, e.g. https://index.example.com")
    pull.add_argument("--batch", metavar="FILE",
                      help="pull every 'REFERENCE [LOCAL]' line of FILE ('-': stdin) at once")
    pull.add_argument("--stats", action="store_true",
                      help="say afterwards where the bytes and the seconds went")
    pull.add_argument("reference", metavar="REFERENCE", nargs="?",
                      help="[HOST[:PORT]/]NAME[:TAG|@DIGEST]")
    pull.add_argument("local", metavar="LOCAL", nargs="?", help="machine name (default: last name component)")
    pull.set_defaults(func=cmd_pull)

    demo = sub.add_parser("demo", help="start a local registry with a sample image and pull it")
    _common(demo)
    demo.set_defaults(image_root=Path("/var/tmp/dkr-demo"))
    demo.add_argument("--backend", default="auto")
    demo.set_defaults(func=cmd_demo)

    manage.add_commands(sub, _common)
    login.add_commands(sub, _common)
    return parser


def _platform_arg(text: str):
    try:
        return parse_platform(text)
    except DkrError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _size_arg(text: str) -> int:
    units = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
    number, unit = text[:-1] if text[-1:].upper() in units and text[-1:].isalpha() else text, \
        text[-1:].upper() if text[-1:].isalpha() else ""
    if not number.isdigit() or unit not in units:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: want a number with K, M, G or T")
    return int(number) * units[unit]


def _creds_arg(text: str):
    try:
        return parse_creds(text)
    except DkrError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _events(args) -> tuple[Events, StatsRenderer | None, "LiveView | None"]:
    live = _live_view(args)
    renderers = [LogLines(phases=live is None), live or PlainProgress()]
    if getattr(args, "json", False):
        renderers.append(JsonRenderer(sys.stdout))
    stats = StatsRenderer() if getattr(args, "stats", False) else None
    if stats:
        renderers.append(stats)
    return Events(renderers), stats, live


def _live_view(args):
    """The live display of the layers, where stderr is a terminal that can show it
    (and no JSON lines are written to the same terminal); None elsewhere."""
    if args.quiet or not sys.stderr.isatty() or os.environ.get("TERM") == "dumb" or \
            (args.json and sys.stdout.isatty()):
        return None
    from dkr.cli.progress_view import LiveView     # (rich loads only where it draws)
    return LiveView(sys.stderr, batch=bool(args.batch))


def cmd_pull(args) -> int:
    if not 1 <= args.jobs <= MAX_JOBS:
        raise DkrError(f"--jobs must be 1 to {MAX_JOBS}")
    if not 0 <= args.retries <= MAX_RETRIES or not 1 <= args.stall_timeout <= MAX_STALL:
        raise DkrError(f"--retries must be 0 to {MAX_RETRIES} and --stall-timeout "
                       f"1 to {MAX_STALL} seconds")
    if args.batch and (args.reference is not None or args.local or args.v1):
        raise DkrError("--batch takes the images from FILE: give no REFERENCE, LOCAL or --v1")
    if not args.batch and args.reference is None:
        raise DkrError("a REFERENCE (or --batch FILE) is required")
    options = api.PullOptions(
        image_root=args.image_root, backend=args.backend, force=args.force,
        platform=args.platform, insecure=args.insecure, ca_file=args.ca_file,
        credentials=args.creds, jobs=args.jobs, retries=args.retries,
        stall_timeout=args.stall_timeout, spool_limit=args.spool_limit,
        stage_ahead=args.stage_ahead, registries_conf=args.registries_conf,
        cert_dir=args.cert_dir, choose=_chooser(),
        signature_policy=args.signature_policy, registries_d=args.registries_d,
        settings=args.settings)
    events, stats, live = _events(args)
    try:
        if live:
            live.start()
        if args.v1 and not args.index_url:
            raise DkrError("--v1 needs --index-url URL")
        if args.index_url and not args.v1:
            raise DkrError("--index-url only applies to --v1 pulls")
        try:
            if args.batch:
                return _pull_batch(args.batch, options, events)
            if args.v1:
                api.pull_v1(args.reference, args.local, index_url=args.index_url,
                            options=options, events=events)
            else:
                api.pull(args.reference, args.local, options=options, events=events)
        except DkrError as e:         # (one image's failure in a batch has its own event)
            _emit_error(events, args.reference or args.batch, e,    # (a batch's: no one image's)
                        None if args.batch else _machine_name(args.reference, args.local))
            raise
        return 0
    finally:
        if live:              # (on an error, its event stopped it already)
            live.stop(keep=sys.exc_info()[0] is not None)
        if stats:
            stats.print()


def _chooser():
    """A prompt for a short name's candidates, where stdin and stdout are a terminal
    (as podman asks); None elsewhere."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return None

    def choose(candidates):
        print("Which image did you mean?", file=sys.stderr)
        for number, candidate in enumerate(candidates, 1):
            print(f"  {number}) {candidate}", file=sys.stderr)
        while True:
            try:
                answer = input(f"Select 1-{len(candidates)}: ").strip()
            except EOFError:
                raise DkrError("no image selected") from None
            if answer.isdigit() and 1 <= int(answer) <= len(candidates):
                return candidates[int(answer) - 1]
    return choose


def _emit_error(events: Events, reference: str, error: DkrError, local: str | None) -> None:
    """The error event; if stdout's reader is gone, the error line on stderr still
    tells what failed (the event must not turn it into a broken pipe)."""
    kind = getattr(error, "kind", None)
    try:
        events.emit("error", reference=reference, local=local, message=str(error),
                    **({"kind": kind} if kind else {}))
    except BrokenPipeError:
        pass


def _machine_name(reference: str, local: str | None) -> str | None:
    """The machine an image was to become (None: its reference says none)."""
    try:
        return local or default_machine_name(parse_reference(reference).name)
    except DkrError:
        return None


def _pull_batch(path: str, options, events) -> int:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DkrError(f"cannot read batch file {path}: {getattr(e, 'strerror', None) or e}") from None
    items = api.read_batch_file(text, "stdin" if path == "-" else path)
    outcomes = api.pull_batch(items, options=options, events=events)
    failed = [(item, o) for item, o in zip(items, outcomes) if isinstance(o, DkrError)]
    for (reference, local), error in failed:
        _emit_error(events, reference, error, _machine_name(reference, local))
        print(one_line(f"dkr: error: {reference}: {error}"), file=sys.stderr)
    logging.getLogger("dkr").info("Pulled %d of %d images%s.", len(items) - len(failed),
                                  len(items), f"; {len(failed)} failed" if failed else "")
    return 1 if failed else 0


def cmd_demo(args) -> int:
    from dkr.cli.demo import run_demo
    return run_demo(args.image_root, args.backend)


class _OneLineFormatter(logging.Formatter):
    """One line per record; in a batch, led by the machine it is about (the event's,
    else that of the image whose task logs it)."""

    def __init__(self, batch: bool):
        super().__init__("%(message)s")
        self.batch = batch

    def format(self, record: logging.LogRecord) -> str:
        text = one_line(super().format(record))
        image = getattr(record, "image", None) or bound_fields().get("local")
        return f"{image}: {text}" if self.batch and image else text


def _setup_logging(args) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter(bool(getattr(args, "batch", None))))
    root = logging.getLogger("dkr")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _reader_gone(stream) -> bool:
    """Whether ``stream`` is a pipe whose reading end was closed."""
    try:
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    try:
        status = args.func(args)
        sys.stdout.flush()            # a reader that went away is found out here, not at exit
        return status
    except DkrError as e:
        print(one_line(f"dkr: error: {e}"), file=sys.stderr)
        return e.exit_code
    except OSError as e:
        if isinstance(e, BrokenPipeError) and _reader_gone(sys.stdout):
            # `dkr inspect X | head`: stop without a word, as a program that
            # SIGPIPE ends would (and so that the exit's flush cannot fail again).
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 128 + signal.SIGPIPE
        # A file system refusing something (full, read-only, permissions) is the
        # user's to fix, not a bug: say what and where, in one line.
        print(one_line(f"dkr: error: {os_error_text(e)}"), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dkr: error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
