"""What dkr does with what registries and token servers say about logins.

The policy is tested on the Authenticator itself, with a recorder standing in
for the token server's answers; the end-to-end logins against a real registry
and token server are in test_pull_v2.py.
"""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from helpers import assert_clean_failure, run_dkr

from dkr.registry.auth import Authenticator, Credentials
from dkr.errors import DkrError
from dkr.transport.job import Response
from dkr.registry.keychain import find_credentials
from dkr.registry.client import auth_challenge, retry_after

ALICE = Credentials("alice", "s3cret")


class TokenServerAnswers:
    """Records each token request and answers it with ``body``."""

    def __init__(self, body: bytes = b'{"token": "t0ken"}'):
        self.body = body
        self.asked: list[tuple[str, list[str]]] = []

    async def __call__(self, url: str, headers: list[str], what: str) -> tuple[int, bytes]:
        self.asked.append((url, headers))
        return 200, self.body


def _answer(challenge: str, *, insecure: bool = False, body: bytes = b'{"token": "t0ken"}'):
    server = TokenServerAnswers(body)
    auth = Authenticator("registry.example", ALICE, server, insecure=insecure)
    asyncio.run(auth.answer(challenge, "repository:a/b:pull"))
    return server


def test_credentials_never_go_to_a_plain_http_token_realm():
    server = TokenServerAnswers()
    auth = Authenticator("registry.example", ALICE, server)
    with pytest.raises(DkrError, match=r"refusing to ask auth\.example for a token over plain "
                                       r"http \(use --insecure"):
        asyncio.run(auth.answer('Bearer realm="http://auth.example/token"', "repository:a/b:pull"))
    assert server.asked == []
    allowed = _answer('Bearer realm="http://auth.example/token"', insecure=True)
    assert len(allowed.asked) == 1


def test_a_realm_with_a_query_keeps_it():
    server = _answer('Bearer realm="https://auth.example/token?tenant=t1",service="reg"')
    [(url, headers)] = server.asked
    assert url == ("https://auth.example/token?tenant=t1&scope=repository%3Aa%2Fb%3Apull"
                   "&service=reg")
    assert headers == [ALICE.basic_header()]


def test_an_absurd_token_lifetime_is_an_unreadable_answer():
    with pytest.raises(DkrError, match="token server sent an unreadable answer"):
        _answer('Bearer realm="https://auth.example/token"',
                body=b'{"token": "t", "expires_in": 1e999}')


def test_bearer_is_answered_where_a_server_also_offers_basic():
    response = Response("https://r/v2/", 401, {"www-authenticate": [
        'Bearer realm="https://auth.example/token"', 'Basic realm="r"']})
    assert auth_challenge(response).startswith("Bearer ")
    response.headers["www-authenticate"].reverse()
    assert auth_challenge(response).startswith("Bearer ")


@pytest.mark.parametrize("value, seconds", [("7", 7.0), ("\u00b2", None), ("soon", None)])
def test_retry_after_takes_plain_digits_only(value, seconds):
    assert retry_after(Response("https://r/", 429, {"retry-after": [value]})) == seconds


def test_a_docker_config_auth_that_is_not_text_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"auths": {"reg": {"auth": 123}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "no-runtime"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))
    with pytest.raises(DkrError, match=r"the auth entry for reg is not base64 USER:PASS"):
        find_credentials("reg")
    good = base64.b64encode(b"alice:s3cret").decode()
    (tmp_path / "config.json").write_text(json.dumps({"auths": {"reg": {"auth": good}}}))
    assert find_credentials("reg") == ALICE


def test_creds_are_not_handed_to_every_registry_of_a_batch(tmp_path):
    listing = tmp_path / "images.txt"
    listing.write_text("127.0.0.1:1/a/b one\n127.0.0.2:1/c/d two\n")
    run = run_dkr("pull", "--image-root", tmp_path / "root", "--creds", "alice:s3cret",
                  "--json", "--batch", listing)
    assert_clean_failure(run, tmp_path / "root",
                         r"--creds would go to every registry of the batch "
                         r"\(127\.0\.0\.1:1, 127\.0\.0\.2:1\)")
    [error] = [e for e in run.events if e["event"] == "error"]
    assert error["reference"] == str(listing) and "--creds would go" in error["message"]


@pytest.mark.parametrize("values", [
    ['Basic realm="r", Bearer realm="https://auth.example/token",service="reg"'],
    ['Bearer realm="https://auth.example/token",service="reg", Basic realm="r"'],
    ['Basic realm="a, Bearer b=c"', 'Bearer realm="https://auth.example/token",service="reg"'],
    ['Negotiate YII+/abc==, Bearer realm="https://auth.example/token",service="reg"'],
    ['Mystery @@ odd, Bearer realm="https://auth.example/token",service="reg"'],
])
def test_bearer_is_found_among_challenges_in_one_header(values):
    challenge = auth_challenge(Response("https://r/v2/", 401, {"www-authenticate": values}))
    assert challenge == 'Bearer realm="https://auth.example/token",service="reg"'
    [(url, _)] = _answer(challenge).asked
    assert url.startswith("https://auth.example/token?scope=") and url.endswith("&service=reg")


def test_a_tab_may_follow_the_scheme():
    [(url, _)] = _answer('Bearer\trealm="https://auth.example/token",service="reg"').asked
    assert url.startswith("https://auth.example/token?")
