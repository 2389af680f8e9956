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
from dkr.errors import DkrError, UsageError, one_line, os_error_text
from dkr.events import Events, bound_fields
from dkr.registry.auth import Credentials, parse_creds
from dkr.registry.reference import default_machine_name, parse_reference
from dkr.registry.v2 import parse_platform

if TYPE_CHECKING:
    from dkr.cli.progress_view import LiveView

DEFAULT_IMAGE_ROOT = "/var/lib/machines"
# Upper bounds: libcurl takes these as C longs, and nothing sensible needs more.
MAX_JOBS = 1024
MAX_RETRIES = 1000
MAX_STALL = 7 * 24 * 3600


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's, sized to the terminal once per process; descriptions and
    epilogs (examples, environment) keep their lines as written.

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
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _common(parser: argparse.ArgumentParser, image_root: bool = True) -> None:
    """The options every command takes, before its name or after it. After it they
    must not reset what was given before: their defaults are the top parser's alone
    (argparse copies a subcommand's defaults over the top parser's values)."""
    if image_root:
        parser.add_argument("--image-root", default=argparse.SUPPRESS, type=Path, metavar="DIR",
                            help=f"where layers and machines live (default {DEFAULT_IMAGE_ROOT})")
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="say more")
    parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="only errors")


EXAMPLES = """\
examples:
  dkr pull debian:12                      machine 'debian' of docker.io/library/debian:12
  dkr pull quay.io/fedora/fedora:40 f40   machine 'f40': /var/lib/machines/f40
  dkr --image-root /srv/machines list     the machines of another image root
  dkr pull --creds alice example.com/app  asks for alice's password
  dkr login registry.example.com          stores a login where podman keeps it
  dkr gc                                  removes layers no machine needs
"""

ENVIRONMENT = """\
environment:
  CONTAINERS_REGISTRIES_CONF  the registries.conf to read (as --registries-conf)
  REGISTRY_AUTH_FILE          the only auth file to read logins from (as --authfile)
  XDG_RUNTIME_DIR             logins in $XDG_RUNTIME_DIR/containers/auth.json
  XDG_CONFIG_HOME             logins in $XDG_CONFIG_HOME/containers/auth.json
  DOCKER_CONFIG               logins in $DOCKER_CONFIG/config.json (~/.docker)
  XDG_CACHE_HOME              where a short name's chosen registry is recorded
  HOME                        the per-user files: ~/.config/containers, certs.d
  DKR_SIGNATURE_POLICY        the default --signature-policy
  DKR_REGISTRIES_D            the default --registries.d
  SSL_CERT_FILE               the CA certificates to trust instead of the system's
  COLUMNS                     the width of help text
"""

PULL_EXAMPLES = """\
examples:
  dkr pull debian:12
  dkr pull docker://quay.io/fedora/fedora:40 f40
  dkr pull --platform linux/arm64 alpine
  dkr pull --tls-verify=false 127.0.0.1:5000/app:1
  echo "$TOKEN" | dkr pull --creds ci --password-stdin \\
      registry.example.com/team/app
  dkr pull --batch images.txt --json
"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dkr", description="Pull container images into ready root file systems.",
        epilog=EXAMPLES + "\n" + ENVIRONMENT)
    parser.add_argument("--version", action="version", version=f"dkr {__version__}")
    parser.add_argument("--image-root", type=Path, default=None, metavar="DIR",
                        help=f"where layers and machines live (default {DEFAULT_IMAGE_ROOT})")
    parser.add_argument("-v", "--verbose", action="store_true", help="say more")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    pull = sub.add_parser("pull", help="pull an image and make a machine from it",
                          epilog=PULL_EXAMPLES + "\n" + ENVIRONMENT)
    _common(pull)
    pull.add_argument("--backend", default="auto", metavar="NAME",
                      help="auto, btrfs, overlay, dir or a plugin's")
    pull.add_argument("--force", action="store_true",
                      help="replace a machine that holds another image, "
                           "discarding changes made in it, in one step: its path never shows "
                           "an empty or half tree. Without it, a machine that already holds "
                           "the image is left as it is (exit 0), one that holds another is "
                           "an error. A tree dkr did not make is never replaced")
    pull.add_argument("--no-settings", dest="settings", action="store_false",
                      help="write no IMAGE_ROOT/LOCAL.nspawn from the image's config")
    pull.add_argument("--platform", type=_platform_arg, metavar="PLATFORM",
                      help="OS/ARCH[/VARIANT] to pick from an index")
    pull.add_argument("--insecure", action="store_true",
                      help="allow plain HTTP and unverified TLS for this registry")
    pull.add_argument("--tls-verify", type=login.bool_arg, default=None, metavar="BOOL",
                      help="false: the same as --insecure (podman's spelling); true: the "
                           "default")
    pull.add_argument("--ca-file", metavar="FILE", help="PEM file of CA certificates to trust")
    pull.add_argument("--creds", type=_creds_arg, metavar="USER[:PASS]",
                      help="the login for the registry; without :PASS the password is asked "
                           "for on the terminal, or read with --password-stdin (a password "
                           "on the command line shows in the process list)")
    pull.add_argument("--password-stdin", action="store_true",
                      help="read the password for --creds USER from stdin")
    pull.add_argument("--authfile", metavar="FILE",
                      help="read logins from this auth.json only (default: $REGISTRY_AUTH_FILE, "
                           "else podman's and docker's files)")
    pull.add_argument("--registries-conf", metavar="FILE",
                      help="read this containers-registries.conf(5) file only (mirrors, "
                           "short names; default: /etc/containers/registries.conf and "
                           "registries.conf.d, or $CONTAINERS_REGISTRIES_CONF)")
    pull.add_argument("--cert-dir", metavar="DIR",
                      help="TLS files for the registries (*.crt CAs, *.cert/*.key client "
                           "pair) instead of the certs.d directories")
    pull.add_argument("--jobs", type=_ranged_int(1, MAX_JOBS), default=6, metavar="N",
                      help="connections per host (default 6)")
    pull.add_argument("--retries", type=_ranged_int(0, MAX_RETRIES), default=4, metavar="N",
                      help="further attempts after a network failure, 429 or 5xx (default 4)")
    pull.add_argument("--spool-limit", type=_size_arg, default=4 * 1024**3, metavar="SIZE",
                      help="download at most this much ahead of extraction, e.g. 500M "
                           "(default 4G; the next layer's blob is always let through)")
    pull.add_argument("--stall-timeout", type=_ranged_int(1, MAX_STALL, "seconds"), default=60,
                      metavar="SECONDS",
                      help="give up on a transfer that moved no data this long (default 60)")
    pull.add_argument("--stage-ahead", choices=("auto", "always", "never"), default="auto",
                      help="inflate and check btrfs/dir layers while their parent is still "
                           "being built, to replay them once it is done (auto: with 4 or more "
                           "cores, where that is faster)")
    pull.add_argument("--spool-all", action="store_true",
                      help="download every blob whole into the spool before extracting it, "
                           "so that a pull killed at any point resumes every download "
                           "(slower on real links; by default a layer that can be built "
                           "at once streams into its extractor and only the others are "
                           "spooled)")
    pull.add_argument("--signature-policy", metavar="FILE",
                      help="trust policy (default: ~/.config/containers/policy.json, else "
                           "/etc/containers/policy.json)")
    pull.add_argument("--registries.d", dest="registries_d", metavar="DIR",
                      help="where signatures are kept (default: ~/.config/containers/"
                           "registries.d and /etc/containers/registries.d)")
    pull.add_argument("--json", action="store_true", help="print events as JSON lines on stdout")
    pull.add_argument("--v1", action="store_true",
                      help="use the Docker Registry v1 protocol (REFERENCE is NAMESPACE/REPO[:TAG])")
    pull.add_argument("--index-url", metavar="URL", help="v1 index, e.g. https://index.example.com")
    pull.add_argument("--batch", metavar="FILE",
                      help="pull every 'REFERENCE [LOCAL]' line of FILE ('-': stdin) at once")
    pull.add_argument("--stats", action="store_true",
                      help="say afterwards where the bytes and the seconds went")
    pull.add_argument("reference", metavar="REFERENCE", nargs="?",
                      help="[docker://][HOST[:PORT]/]NAME[:TAG|@DIGEST]")
    pull.add_argument("local", metavar="LOCAL", nargs="?", help="machine name (default: last name component)")
    pull.set_defaults(func=cmd_pull)

    demo = sub.add_parser("demo", help="start a local registry with a sample image and pull it")
    _common(demo)
    demo.set_defaults(default_image_root=Path("/var/tmp/dkr-demo"))
    demo.add_argument("--backend", default="auto", metavar="NAME",
                      help="auto, btrfs, overlay, dir or a plugin's")
    demo.set_defaults(func=cmd_demo)

    manage.add_commands(sub, _common)
    login.add_commands(sub, functools.partial(_common, image_root=False))

    version = sub.add_parser("version", help="print the versions of dkr, Python and libcurl")
    _common(version, image_root=False)
    version.set_defaults(func=cmd_version)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with each option's value from wherever it was given."""
    args = build_parser().parse_args(argv)
    if getattr(args, "image_root", None) is None:
        args.image_root = getattr(args, "default_image_root", Path(DEFAULT_IMAGE_ROOT))
    return args


def _platform_arg(text: str):
    try:
        return parse_platform(text)
    except DkrError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _ranged_int(low: int, high: int, unit: str = ""):
    """An argument type: a whole number from ``low`` to ``high``, else a usage error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"must be {low} to {high}{' ' + unit if unit else ''}, not {text!r}")
        return value
    return parse


def _size_arg(text: str) -> int:
    units = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
    number, unit = text[:-1] if text[-1:].upper() in units and text[-1:].isalpha() else text, \
        text[-1:].upper() if text[-1:].isalpha() else ""
    if not number.isdigit() or unit not in units:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: want a number with K, M, G or T")
    return int(number) * units[unit]


def _creds_arg(text: str) -> Credentials | str:
    """USER:PASS, or USER alone (a str) whose password is read later."""
    if ":" not in text and text:
        return text
    try:
        return parse_creds(text)
    except DkrError as e:
        raise argparse.ArgumentTypeError(str(e).replace("USER:PASS", "USER[:PASS]")) from None


def _pull_credentials(args) -> Credentials | None:
    """--creds, with its password asked for or read from stdin where it has none."""
    if args.password_stdin and args.batch == "-":
        raise UsageError("--password-stdin and --batch - cannot both read stdin")
    if not isinstance(args.creds, str):
        if args.password_stdin:
            raise UsageError("--password-stdin needs --creds USER (without :PASS)")
        return args.creds
    return Credentials(args.creds, login.read_password(None, args.password_stdin, args.creds))


def _insecure(args) -> bool:
    if args.tls_verify is True and args.insecure:
        raise UsageError("--insecure and --tls-verify=true contradict each other")
    return args.insecure or args.tls_verify is False


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
    events, stats, live = _events(args)
    try:
        try:
            options = _pull_options(args)
            if live:
                live.start()
            if args.batch:
                return _pull_batch(args.batch, options, events)
            if args.v1:
                api.pull_v1(args.reference, args.local, index_url=args.index_url,
                            options=options, events=events)
            else:
                api.pull(args.reference, args.local, options=options, events=events)
        except (DkrError, OSError) as e:  # (one image's failure in a batch has its own event)
            api.report_error(events, args.reference or args.batch, e,  # (a batch's: no image's)
                             None if args.batch else _machine_name(args.reference, args.local))
            raise
        return 0
    finally:
        if live:              # (on an error, its event stopped it already)
            live.stop(keep=sys.exc_info()[0] is not None)
        if stats:
            stats.print()


def _pull_options(args) -> api.PullOptions:
    """The pull's options from its command line; a UsageError where they cannot be."""
    if args.batch and (args.reference is not None or args.local or args.v1):
        raise UsageError("--batch takes the images from FILE: give no REFERENCE, LOCAL or --v1")
    if not args.batch and args.reference is None:
        raise UsageError("a REFERENCE (or --batch FILE) is required")
    if args.authfile and not os.path.isfile(args.authfile):
        raise UsageError(f"--authfile {args.authfile}: no such file")
    if args.v1 and not args.index_url:
        raise UsageError("--v1 needs --index-url URL")
    if args.index_url and not args.v1:
        raise UsageError("--index-url only applies to --v1 pulls")
    return api.PullOptions(
        image_root=args.image_root, backend=args.backend, force=args.force,
        platform=args.platform, insecure=_insecure(args), ca_file=args.ca_file,
        credentials=_pull_credentials(args), auth_file=args.authfile,
        jobs=args.jobs, retries=args.retries,
        stall_timeout=args.stall_timeout, spool_limit=args.spool_limit,
        stage_ahead=args.stage_ahead, spool_all=args.spool_all,
        registries_conf=args.registries_conf,
        cert_dir=args.cert_dir, choose=_chooser(),
        signature_policy=args.signature_policy, registries_d=args.registries_d,
        settings=args.settings)


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


def _machine_name(reference: str | None, local: str | None) -> str | None:
    """The machine an image was to become (None: its reference says none)."""
    if reference is None:
        return local
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
    events.renderers.append(_print_image_error)
    outcomes = api.pull_batch(items, options=options, events=events)
    failed = [local or _machine_name(reference, None) or reference
              for (reference, local), outcome in zip(items, outcomes)
              if isinstance(outcome, DkrError)]
    logging.getLogger("dkr").info("Pulled %d of %d images%s.", len(items) - len(failed),
                                  len(items),
                                  f"; {len(failed)} failed: {', '.join(failed)}" if failed else "")
    return 1 if failed else 0


def _print_image_error(kind: str, fields: dict) -> None:
    """A batch image's error line, when it fails (the others go on)."""
    if kind == "error" and fields.get("local"):
        print(one_line(f"dkr: error: {api.about_image(fields['reference'], fields['message'])}"),
              file=sys.stderr)


def cmd_version(args) -> int:
    import platform

    import pycurl
    print(f"dkr {__version__}")
    print(f"Python {platform.python_version()} ({sys.executable})")
    # pycurl.version: "PycURL/7.45.2 libcurl/7.88.1 OpenSSL/3.0.11 zlib/1.2.13 ..."
    print(pycurl.version)
    return 0


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
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
    except UsageError as e:
        print(one_line(f"dkr: error: {e}"), file=sys.stderr)
        if "--json" in argv:      # (a script reading the events learns why there are none)
            api.report_error(Events([JsonRenderer(sys.stdout)]), None, e, None)
        return e.exit_code
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
