"""A registry's credentials, where ``--creds`` does not give them.

Looked up where ``podman login`` and ``docker login`` leave them, in the order
podman and skopeo read them (containers-auth.json(5)):

1. ``$XDG_RUNTIME_DIR/containers/auth.json`` (``/run/containers/UID/auth.json``
   without it);
2. ``$XDG_CONFIG_HOME/containers/auth.json`` (``~/.config/...``);
3. ``$DOCKER_CONFIG/config.json`` (``~/.docker/config.json``).

A file named by ``--authfile`` (``PullOptions.auth_file``), else
``$REGISTRY_AUTH_FILE``, is the only file read. The first file that has a login for the registry gives it.
In a file, a credential helper named for the host (``credHelpers``) comes
first, then one for all hosts (``credsStore``), then the ``auths`` entries,
the one naming the longest part of ``host/repository`` first. A helper is
the program ``docker-credential-NAME``, asked with ``get`` and the server on
stdin; one that knows no login for it passes the question to the next file.
A pull asks each helper question once (``Puller._login``).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator, NamedTuple

from dkr.errors import AuthError, ConfigError
from dkr.registry.auth import Credentials, unreadable
from dkr.registry.reference import DOCKER_HUB_ALIASES
from dkr.treeops import tied

log = logging.getLogger("dkr.keychain")

HELPER_TIMEOUT = 60                      # a helper may ask a keyring to unlock
HELPER_POLL = 0.2                        # how soon a stopped pull stops its helper
DOCKER_HUB_SERVER = "https://index.docker.io/v1/"
NOT_FOUND = "credentials not found"      # what helpers print for an unknown server


class HelperQuestion(NamedTuple):
    """A credential helper to ask, and the server names to ask it for, in order."""

    program: str
    servers: tuple[str, ...]
    path: Path                     # the auth file that named it

    def ask(self, stop: threading.Event | None = None) -> Credentials | None:
        """The first login the helper knows for one of the servers, or None. Setting
        ``stop`` kills the helper and ends the question: a pull that stops does not
        wait for a keyring prompt."""
        stop = stop or threading.Event()
        for server in self.servers:
            if stop.is_set():
                raise AuthError(f"credential helper {self.program}: not asked, the pull stopped")
            found = _run_helper(self.program, server, self.path, stop)
            if found:
                return found
        return None


def credential_sources(host: str, repository: str = "", auth_file: str | None = None) \
        -> Iterator[Credentials | HelperQuestion]:
    """Where a login for ``host`` may come from, in the order to try them: a login
    ends the search, a helper that knows none passes it to the next file.
    ``auth_file``: the one file to read (--authfile)."""
    for path in auth_files(auth_file):
        config = _read_config(path)
        if config is None:
            continue
        question = _helper_question(config, host, path)
        if question:
            yield question
            continue
        entry = _auths_entry(config, host, repository)
        if entry is not None:
            yield _decode_entry(*entry, path)
            return


def find_credentials(host: str, repository: str = "",
                     auth_file: str | None = None) -> Credentials | None:
    """The login for ``host`` (and ``repository``, which an auth file may name), or None."""
    for source in credential_sources(host, repository, auth_file):
        found = source.ask() if isinstance(source, HelperQuestion) else source
        if found:
            return found
    return None


def auth_files(named: str | None = None) -> list[Path]:
    """The auth files to read, in order: ``named`` alone if given."""
    if named:
        return [Path(named)]
    env = os.environ
    if env.get("REGISTRY_AUTH_FILE"):
        return [Path(env["REGISTRY_AUTH_FILE"])]
    runtime = Path(env["XDG_RUNTIME_DIR"]) / "containers" if env.get("XDG_RUNTIME_DIR") else \
        Path(f"/run/containers/{os.getuid()}")
    try:
        home: Path | None = Path.home()
    except RuntimeError:               # no $HOME, and a user with no passwd entry
        home = None
    config_home = env.get("XDG_CONFIG_HOME") or home and home / ".config"
    docker = env.get("DOCKER_CONFIG") or home and home / ".docker"
    return [runtime / "auth.json"] + \
        ([Path(config_home) / "containers" / "auth.json"] if config_home else []) + \
        ([Path(docker) / "config.json"] if docker else [])


def _read_config(path: Path) -> dict | None:
    """``path``'s settings; None if it is missing, or unreadable (a warning, and a note
    in ``auth.unreadable`` for the error of a pull that then needs a login)."""
    try:
        config = json.loads(path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (FileNotFoundError, NotADirectoryError):
        unreadable.pop(path, None)
        return None
    except (OSError, ValueError) as e:
        why = (e.strerror if isinstance(e, OSError) else None) or str(e)
        if unreadable.get(path) != why:        # (once, not for every image of a batch)
            log.warning("Cannot read credentials from %s: %s; going on without its logins.",
                        path, why)
        unreadable[path] = why
        return None
    unreadable.pop(path, None)
    return config


def _server_names(host: str) -> list[str]:
    """How a login may have written ``host``."""
    names = [host, f"https://{host}", f"http://{host}", f"https://{host}/v1/",
             f"https://{host}/v2/"]
    if host in DOCKER_HUB_ALIASES:
        names += [DOCKER_HUB_SERVER, "index.docker.io", "docker.io"]
    return names


def _helper_question(config: dict, host: str, path: Path) -> HelperQuestion | None:
    """The helper the file names for ``host``, asked for the name that chose it.
    Docker keeps Docker Hub's logins under its v1 URL, podman under docker.io."""
    helpers = config.get("credHelpers")
    if isinstance(helpers, dict):
        for name in _server_names(host):
            if isinstance(helpers.get(name), str) and helpers[name]:
                return HelperQuestion(f"docker-credential-{helpers[name]}", (name,), path)
    store = config.get("credsStore")
    if not isinstance(store, str) or not store:
        return None
    servers = (DOCKER_HUB_SERVER, "docker.io") if host in DOCKER_HUB_ALIASES else (host,)
    return HelperQuestion(f"docker-credential-{store}", servers, path)


def _auths_entry(config: dict, host: str, repository: str) -> tuple[str, dict] | None:
    auths = config.get("auths")
    if not isinstance(auths, dict):
        return None
    parts = repository.split("/") if repository else []
    scoped = [f"{host}/{'/'.join(parts[:n])}" for n in range(len(parts), 0, -1)]
    for key in scoped + _server_names(host):
        entry = auths.get(key)
        if isinstance(entry, dict) and (entry.get("auth") or entry.get("username")):
            return key, entry
    return None


def _decode_entry(key: str, entry: dict, path: Path) -> Credentials:
    if entry.get("auth"):
        try:
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
        except (ValueError, TypeError, UnicodeDecodeError):
            raise ConfigError(f"{path}: the auth entry for {key} is not base64 USER:PASS") from None
        return Credentials(user, password)
    return Credentials(str(entry["username"]), str(entry.get("password", "")))


def _talk(proc: subprocess.Popen, server: str,
          stop: threading.Event) -> tuple[bytes, bytes] | None:
    """The helper's stdout and stderr; None if ``stop`` was set or it took too long.
    It is killed then, without waiting for programs it started (a keyring's
    prompt) to let go of its pipes."""
    deadline = time.monotonic() + HELPER_TIMEOUT
    given: bytes | None = server.encode()
    try:
        while True:
            try:
                return proc.communicate(given, timeout=HELPER_POLL)
            except subprocess.TimeoutExpired:
                given = None               # (sent already; communicate goes on from there)
                if stop.is_set() or time.monotonic() > deadline:
                    return None
    finally:                               # also on Ctrl-C in a caller's own thread
        if proc.returncode is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            pipe.close()


def _run_helper(program: str, server: str, path: Path,
                stop: threading.Event) -> Credentials | None:
    try:
        if "\0" in program:
            raise ValueError("embedded null byte")
        import shutil  # here: it costs every start of dkr ~5 ms
        found = shutil.which(program)
        if found is None:
            raise FileNotFoundError(program)
        # tied: a helper must not outlive a killed dkr (it may wait on a keyring for ever).
        proc = subprocess.Popen(tied([found, "get"]), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise AuthError(f"credential helper {program} (named in {path}) is not installed") \
            from None
    except (OSError, ValueError) as e:                 # ValueError: a NUL in its name
        raise AuthError(f"credential helper {program!r} (named in {path}): {e}") from None
    output = _talk(proc, server, stop)
    if output is None:
        raise AuthError(f"credential helper {program}: no answer for {server}"
                       f"{'' if stop.is_set() else f' in {HELPER_TIMEOUT} s'}")
    return _answer(program, server, proc.returncode, *output)


def _answer(program: str, server: str, status: int, out: bytes, err: bytes) \
        -> Credentials | None:
    """What a helper's exit status and output say: a login, none, or an error."""
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    said = (stdout.strip() or stderr.strip()).splitlines()
    if status != 0:
        if said and NOT_FOUND in said[0].lower():
            return None
        raise AuthError(f"credential helper {program} failed for {server}: "
                       f"{said[0][:200] if said else f'exit status {status}'}")
    try:
        answer = json.loads(stdout)
        username, secret = answer["Username"], answer["Secret"]
    except (ValueError, KeyError, TypeError):
        raise AuthError(f"credential helper {program} gave an unreadable answer for {server}") \
            from None
    if not isinstance(username, str) or not isinstance(secret, str):
        raise AuthError(f"credential helper {program} gave an unreadable answer for {server}")
    if username == "<token>":
        raise AuthError(f"credential helper {program} gives an identity token for {server}, "
                       "which dkr cannot use: pass --creds")
    return Credentials(username, secret)
