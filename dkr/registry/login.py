"""``dkr login`` and ``dkr logout``: the auth.json that podman login writes.

The file is the one podman writes (containers-auth.json(5)): ``--authfile``,
else ``$REGISTRY_AUTH_FILE``, else ``$XDG_RUNTIME_DIR/containers/auth.json``;
an entry is ``"auths": {"HOST[:PORT][/NAMESPACE]": {"auth": base64(USER:PASS)}}``
and everything else in the file is kept as it was. A login is checked against
the registry (its ``/v2/`` answered with the credentials, through a token
server if it has one) before it is stored.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from pathlib import Path

from dkr.errors import DkrError
from dkr.registry.auth import Credentials
from dkr.registry.client import RegistryClient
from dkr.registry.keychain import auth_files
from dkr.registry.reference import DOCKER_HUB_ALIASES, host_is_valid
from dkr.transport.glue import CurlGlue
from dkr.transport.job import TransferOptions


def login_key(registry: str) -> str:
    """The auths key for what the user typed: ``HOST[:PORT][/NAMESPACE]``."""
    key = registry.strip().removeprefix("https://").removeprefix("http://").rstrip("/")
    host = key.split("/", 1)[0]
    if not key or not host_is_valid(host):
        raise DkrError(f"invalid registry {registry!r}: want HOST[:PORT][/NAMESPACE]")
    return key


def auth_file(named: str | None = None) -> Path:
    return auth_files(named)[0]


async def check_login(key: str, credentials: Credentials, options: TransferOptions) -> None:
    """Ask the registry whether it takes ``credentials``; a DkrError if not."""
    host = key.split("/", 1)[0]
    endpoint = "registry-1.docker.io" if host in DOCKER_HUB_ALIASES else host
    glue = CurlGlue()
    try:
        client = RegistryClient(glue, endpoint, credentials=credentials, options=options)
        await client.ping()
        try:
            # (A token without a scope: what podman and docker ask for at login.)
            response = await client.get("/v2/", scope="", what=f"{endpoint}: /v2/")
        except DkrError as e:
            why = str(e).removeprefix(endpoint + ": ")
            if "refused for" in why and "(401)" in why:
                why = f"the registry refused the credentials for {credentials.username!r}"
            raise DkrError(f"login to {key} failed: {why}") from None
        if response.status == 401:
            raise DkrError(f"login to {key} failed: the registry refused the credentials "
                           f"for {credentials.username!r}")
        if response.status != 200:
            raise DkrError(f"login to {key} failed: /v2/ answered {response.status}")
    finally:
        glue.close()


def _read(path: Path) -> dict:
    try:
        config = json.loads(path.read_text() or "{}")
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise DkrError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("auths", {}), dict):
        raise DkrError(f"cannot read {path}: not an auth file (want a JSON object with 'auths')")
    return config


def _write(path: Path, config: dict) -> None:
    """Replace ``path`` whole (a reader never sees half a file), readable by its owner only."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".auth.json.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(config, f, indent="\t")
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        raise DkrError(f"cannot write {path}: {e.strerror}") from None


def store_login(path: Path, key: str, credentials: Credentials) -> None:
    config = _read(path)
    auth = base64.b64encode(f"{credentials.username}:{credentials.password}".encode()).decode()
    config.setdefault("auths", {})[key] = {"auth": auth}
    _write(path, config)


def remove_login(path: Path, key: str | None) -> None:
    """Forget ``key``'s login (None: every login in the file)."""
    config = _read(path)
    auths = config.get("auths", {})
    if key is None:
        config["auths"] = {}
    elif key in auths:
        del auths[key]
    else:
        raise DkrError(f"not logged in to {key} (no login in {path})")
    _write(path, config)
