"""``dkr login`` and ``dkr logout``, with podman login's options."""

from __future__ import annotations

import argparse
import getpass
import logging
import sys

from dkr import api
from dkr.errors import DkrError, UsageError
from dkr.registry.auth import Credentials

log = logging.getLogger("dkr")


def add_commands(sub, common) -> None:
    p = sub.add_parser("login", help="log in to a registry (stored where podman keeps logins)")
    common(p)
    p.add_argument("--username", "-u", metavar="USER",
                   help="the user name (asked for on a terminal)")
    p.add_argument("--password", "-p", metavar="PASS",
                   help="the password (visible to other users in the process list: "
                        "prefer --password-stdin or the prompt)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.add_argument("--authfile", metavar="FILE",
                   help="the auth file (default $REGISTRY_AUTH_FILE, else "
                        "$XDG_RUNTIME_DIR/containers/auth.json)")
    p.add_argument("--cert-dir", metavar="DIR",
                   help="TLS files for the registry (*.crt, *.cert/*.key) instead of certs.d")
    p.add_argument("--tls-verify", type=bool_arg, default=None, metavar="BOOL",
                   help="false: allow plain HTTP and unverified TLS (default: as "
                        "registries.conf says)")
    p.add_argument("--registries-conf", metavar="FILE", help="the one registries.conf to read")
    p.add_argument("registry", metavar="REGISTRY", help="HOST[:PORT][/NAMESPACE]")
    p.set_defaults(func=cmd_login)

    p = sub.add_parser("logout", help="remove a registry's login")
    common(p)
    p.add_argument("--authfile", metavar="FILE", help="the auth file (as for login)")
    p.add_argument("--all", "-a", action="store_true", help="remove every login in the file")
    p.add_argument("registry", metavar="REGISTRY", nargs="?", help="HOST[:PORT][/NAMESPACE]")
    p.set_defaults(func=cmd_logout)


def bool_arg(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"want true or false, not {text!r}")


def read_password(given: str | None, from_stdin: bool, user: str) -> str:
    """The password: ``given``, read from stdin (--password-stdin: one line, as podman
    reads it), or asked for on the terminal."""
    if from_stdin:
        return sys.stdin.read().removesuffix("\n").removesuffix("\r")
    if given is not None:
        return given
    if sys.stdin.isatty():
        return getpass.getpass(f"Password for {user}: ")
    raise UsageError("no password: give it on a terminal, or with --password-stdin")


def cmd_login(args) -> int:
    if args.password is not None and args.password_stdin:
        raise UsageError("--password and --password-stdin cannot go together")
    username = args.username
    if not username:
        if args.password_stdin or not sys.stdin.isatty():
            raise UsageError("a --username is required when the password comes from stdin "
                             "or there is no terminal")
        username = input("Username: ").strip()
    password = read_password(args.password, args.password_stdin, username)
    if not username or not password:
        raise DkrError("a user name and a password are required")
    if ":" in username:
        raise DkrError("a user name cannot contain ':'")
    insecure = None if args.tls_verify is None else not args.tls_verify
    path = api.login(args.registry, Credentials(username, password), authfile=args.authfile,
                     cert_dir=args.cert_dir, insecure=insecure,
                     registries_conf=args.registries_conf)
    log.info("Login Succeeded (stored in %s).", path)
    return 0


def cmd_logout(args) -> int:
    if args.all == (args.registry is not None):
        raise UsageError("give a REGISTRY or --all")
    path = api.logout(args.registry, authfile=args.authfile)
    log.info("Removed %s from %s.", "every login" if args.all else f"the login for {args.registry}",
             path)
    return 0
