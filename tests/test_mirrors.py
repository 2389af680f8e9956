"""Mirrors and pull-through caches from registries.conf, against real registries on loopback.

The upstream is a distribution registry holding the images; the cache is a
second one in proxy mode (``proxy: remoteurl:``) that fills itself from the
upstream. Both speak plain http, so registries.conf marks them insecure.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from helpers import assert_clean_failure, assert_ok, run_dkr

from dkr.testing import images
from dkr.testing.faultproxy import FaultProxy
from dkr.testing.images import File, Image, Layer
from dkr.testing.registry import Registry

REPO = "team/app"


def _image(seed: int = 0) -> Image:
    return Image([Layer([File(f"layer{i}/data", bytes([seed + i]) * (200_000 + i))],
                        compression="gzip") for i in range(3)])


@pytest.fixture(scope="module")
def upstream():
    with Registry() as reg:
        images.push_image(reg, REPO, "v1", _image())
        yield reg


def _layer_digests(reg: Registry, repo: str = REPO, tag: str = "v1") -> list[str]:
    import json
    status, _, body = reg.get(f"/v2/{repo}/manifests/{tag}", headers={
        "Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert status == 200
    return [layer["digest"] for layer in json.loads(body)["layers"]]


def _blob_gets(reg: Registry, digest: str = "sha256:") -> list[str]:
    """The user agents of the GETs of ``digest`` (any blob) that the registry
    answered 200, from its access log."""
    log = reg.log_path.read_text()
    return re.findall(rf'"GET /v2/[^ ]*/blobs/{digest}[^ ]* HTTP/[\d.]+" 200 .*"([^"]*)"$', log,
                      re.MULTILINE)


def _user_home(tmp_path: Path, conf: str, name: str = "50-fleet.conf") -> dict:
    """An environment whose user drop-in directory holds ``conf``: read as podman
    reads it, beside the system's files."""
    home = tmp_path / "home"
    drop_ins = home / ".config/containers/registries.conf.d"
    drop_ins.mkdir(parents=True, exist_ok=True)
    (drop_ins / name).write_text(conf)
    env = {k: v for k, v in os.environ.items()
           if k not in ("CONTAINERS_REGISTRIES_CONF", "REGISTRY_AUTH_FILE")}
    env.update(HOME=str(home), XDG_RUNTIME_DIR=str(home / "run"))
    return env


def _mirror_conf(upstream: Registry, *mirrors: str) -> str:
    text = f'[[registry]]\nlocation = "{upstream.host}"\ninsecure = true\n'
    for mirror in mirrors:
        text += f'[[registry.mirror]]\nlocation = "{mirror}"\ninsecure = true\n'
    return text


def _pull(ref: str, root: Path, *extra, env=None):
    return run_dkr("pull", "--image-root", root, "--backend", "dir", "--json", "--stats",
                   *extra, ref, env=env)


def _served(run) -> dict[str, set[str]]:
    """Which host served which request, from the JSON events."""
    served: dict[str, set[str]] = {}
    for event in run.events:
        if event["event"] == "source":
            served.setdefault(event["source"], set()).add(event["what"])
    return served


def test_pull_through_cache_then_upstream_when_it_is_down(upstream, tmp_path):
    digests = _layer_digests(upstream)
    with Registry(proxy_of=upstream.url) as cache:
        env = _user_home(tmp_path, _mirror_conf(upstream, cache.host))
        before = {d: len(_blob_gets(upstream, d)) for d in digests}
        run = assert_ok(_pull(f"{upstream.host}/{REPO}:v1", tmp_path / "a", env=env))
        served = _served(run)
        assert set(served) == {cache.host}, served
        assert sum(1 for what in served[cache.host] if "layer" in what) == 3
        for digest in digests:
            hex_ = digest.split(":")[1]
            assert (cache.storage / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ /
                    "data").is_file()
            # Only the cache reached the upstream (distribution 2.8 may fetch a
            # blob twice while it fills: once to serve, once to store).
            agents = _blob_gets(upstream, digest)[before[digest]:]
            assert agents and all(a.startswith("Go-http-client") for a in agents), agents
        assert re.search(rf"source +{re.escape(cache.host)} \(mirror\): \d+ requests", run.err)
        # Warm: the upstream serves no blob at all.
        before = len(_blob_gets(upstream))
        run = assert_ok(_pull(f"{upstream.host}/{REPO}:v1", tmp_path / "warm", env=env))
        assert set(_served(run)) == {cache.host}
        assert len(_blob_gets(upstream)) == before
    # The cache is gone: the registry itself serves, the pull succeeds.
    run = assert_ok(_pull(f"{upstream.host}/{REPO}:v1", tmp_path / "b", env=env))
    served = _served(run)
    assert set(served) == {upstream.host}, served
    assert any(e["event"] == "source-failed" and e["source"] == cache.host for e in run.events)
    assert (tmp_path / "b/app/layer2/data").read_bytes() == bytes([2]) * 200_002


def test_a_mirror_serving_a_corrupt_blob_is_passed_over(upstream, tmp_path):
    digests = _layer_digests(upstream)
    with FaultProxy("127.0.0.1", upstream.port) as bad:
        bad.add_fault(f"/blobs/{digests[1]}", "corrupt", times=None, offset=20)
        env = _user_home(tmp_path, _mirror_conf(upstream, bad.host))
        run = assert_ok(_pull(f"{upstream.host}/{REPO}:v1", tmp_path / "root", env=env))
    failed = [e for e in run.events if e["event"] == "source-failed"]
    assert [e["source"] for e in failed] == [bad.host], failed
    assert digests[1] in failed[0]["what"]
    served = _served(run)
    assert [w for w in served[upstream.host] if "layer" in w] == [f"layer {digests[1]}"]
    assert (tmp_path / "root/app/layer1/data").read_bytes() == bytes([1]) * 200_001


def test_a_mirror_that_answers_errors_is_passed_over(upstream, tmp_path):
    with FaultProxy("127.0.0.1", upstream.port) as bad:
        bad.add_fault("/manifests/", "status", times=None, code=503)
        bad.add_fault("/blobs/", "status", times=None, code=404)
        env = _user_home(tmp_path, _mirror_conf(upstream, bad.host))
        run = assert_ok(_pull(f"{upstream.host}/{REPO}:v1", tmp_path / "root", env=env))
    assert set(_served(run)) == {upstream.host}


def test_location_rewrites_a_prefix_to_another_host_and_path(upstream, tmp_path):
    conf = tmp_path / "registries.conf"
    conf.write_text(f'[[registry]]\nprefix = "fleet.example/apps"\n'
                    f'location = "{upstream.host}/team"\ninsecure = true\n')
    run = assert_ok(_pull("fleet.example/apps/app:v1", tmp_path / "root",
                          "--registries-conf", conf))
    assert set(_served(run)) == {upstream.host}
    assert (tmp_path / "root/app/layer0/data").is_file()


def test_blocked_registry_is_refused(upstream, tmp_path):
    conf = tmp_path / "registries.conf"
    conf.write_text(f'[[registry]]\nlocation = "{upstream.host}"\nblocked = true\n')
    run = _pull(f"{upstream.host}/{REPO}:v1", tmp_path / "root", "--registries-conf", conf)
    assert_clean_failure(run, tmp_path / "root", rf"registry {re.escape(upstream.host)} is "
                                                 r"blocked in .*registries.conf")


def test_short_names_aliases_and_search_registries(upstream, tmp_path):
    with Registry() as empty:
        conf = tmp_path / "registries.conf"
        conf.write_text(f'unqualified-search-registries = ["{empty.host}", "{upstream.host}"]\n'
                        f'short-name-mode = "enforcing"\n'
                        f'[aliases]\n"app" = "{upstream.host}/{REPO}"\n'
                        f'[[registry]]\nlocation = "{empty.host}"\ninsecure = true\n'
                        f'[[registry]]\nlocation = "{upstream.host}"\ninsecure = true\n')
        assert_ok(_pull("app:v1", tmp_path / "a", "--registries-conf", conf))
        assert (tmp_path / "a/app/layer0/data").is_file()
        # Enforcing, no terminal, two candidates: an error that names them.
        run = _pull("team/app:v1", tmp_path / "b", "--registries-conf", conf)
        assert_clean_failure(run, tmp_path / "b", rf"ambiguous.*{re.escape(empty.host)}/team/"
                                                  rf"app:v1, {re.escape(upstream.host)}/team/app")
        # Permissive: each in turn; the first has no such image.
        conf.write_text(conf.read_text().replace("enforcing", "permissive"))
        run = assert_ok(_pull("team/app:v1", tmp_path / "c", "--registries-conf", conf))
        assert any(e["event"] == "resolved" and e["resolved"].startswith(upstream.host)
                   for e in run.events)


def test_credentials_go_to_the_host_contacted(tmp_path):
    """--creds is for the registry named; a mirror gets the login stored for its own host."""
    import base64
    import json

    with Registry(auth=("htpasswd", {"alice": "wonderland"})) as locked, \
            FaultProxy("127.0.0.1", locked.port) as mirror:
        images.push_image(locked, REPO, "v1", _image(5))
        env = _user_home(tmp_path, _mirror_conf(locked, mirror.host))
        env["REGISTRY_AUTH_FILE"] = str(tmp_path / "auth.json")
        (tmp_path / "auth.json").write_text("{}")
        run = assert_ok(_pull(f"{locked.host}/{REPO}:v1", tmp_path / "a", "--creds",
                              "alice:wonderland", env=env))
        assert set(_served(run)) == {locked.host}
        failed = [e for e in run.events if e["event"] == "source-failed"]
        assert failed and all(e["source"] == mirror.host and "requires a login" in e["reason"]
                              for e in failed), failed
        # A login stored for the mirror's host, none for the registry's: the mirror serves.
        auth = base64.b64encode(b"alice:wonderland").decode()
        (tmp_path / "auth.json").write_text(json.dumps({"auths": {mirror.host: {"auth": auth}}}))
        run = assert_ok(_pull(f"{locked.host}/{REPO}:v1", tmp_path / "b", env=env))
        assert set(_served(run)) == {mirror.host}


def test_a_digest_pull_checks_the_mirrors_manifest(upstream, tmp_path):
    status, headers, _ = upstream.get(f"/v2/{REPO}/manifests/v1", headers={
        "Accept": "application/vnd.oci.image.manifest.v1+json"})
    digest = headers["Docker-Content-Digest"]
    with FaultProxy("127.0.0.1", upstream.port) as bad:
        bad.add_fault("/manifests/", "corrupt", times=None, offset=5)
        conf = tmp_path / "registries.conf"
        conf.write_text(_mirror_conf(upstream, bad.host) + 'pull-from-mirror = "digest-only"\n')
        run = assert_ok(_pull(f"{upstream.host}/{REPO}@{digest}", tmp_path / "root",
                              "--registries-conf", conf))
    failed = [e for e in run.events if e["event"] == "source-failed"]
    assert [(e["source"], e["reason"]) for e in failed] == [
        (bad.host, "content does not match its digest")], failed
    served = _served(run)
    assert f"{upstream.host}/{REPO}: manifest {digest}" in served[upstream.host]
    assert any("layer" in what for what in served[bad.host])


def test_a_mirrors_ca_comes_from_its_own_certs_d(upstream, tmp_path):
    import shutil

    with Registry(tls=True, proxy_of=upstream.url) as cache:
        conf = f'[[registry]]\nlocation = "{upstream.host}"\ninsecure = true\n' \
               f'[[registry.mirror]]\nlocation = "{cache.host}"\n'
        env = _user_home(tmp_path, conf)
        run = _pull(f"{upstream.host}/{REPO}:v1", tmp_path / "a", "--retries", "0", env=env)
        assert run.rc == 0, run.err
        assert set(_served(run)) == {upstream.host}         # the mirror's CA is unknown
        certs = tmp_path / "home/.config/containers/certs.d" / cache.host
        certs.mkdir(parents=True)
        shutil.copy(cache.ca_file, certs / "ca.crt")
        run = assert_ok(_pull(f"{upstream.host}/{REPO}:v1", tmp_path / "b", env=env))
        assert set(_served(run)) == {cache.host}


def test_an_air_gapped_site_needs_only_its_mirror(upstream, tmp_path):
    """The registry itself is never contacted while a mirror serves everything."""
    with Registry(proxy_of=upstream.url) as cache:
        conf = tmp_path / "registries.conf"
        conf.write_text('[[registry]]\nlocation = "registry.invalid"\n'
                        f'[[registry.mirror]]\nlocation = "{cache.host}"\ninsecure = true\n')
        run = assert_ok(_pull(f"registry.invalid/{REPO}:v1", tmp_path / "root",
                              "--registries-conf", conf, "-v"))
    assert set(_served(run)) == {cache.host}
    # -v says, request by request, which source served it and how much.
    line = rf"layer sha256:\w+: served by {re.escape(cache.host)} \(mirror\), \d+ bytes"
    assert len(re.findall(line, run.err)) == 3, run.err
    assert "registry.invalid" not in run.err.replace(f"registry.invalid/{REPO}", "")


@pytest.mark.parametrize("where", ["header", "early", "late"])
def test_a_mirror_corrupting_a_blob_while_it_is_unpacked(tmp_path, where):
    """The extractor follows the blob as it arrives and so sees the mirror's bad
    bytes: the layer starts over from the next source, and the pull succeeds."""
    import random

    rng = random.Random(7)
    # Text, so that the gzip stream is made of coded blocks that bad bytes break early.
    data = b"".join(b"%d %s\n" % (i, rng.choice([b"alpha", b"beta", b"gamma"]) * rng.randint(1, 9))
                    for i in range(120_000))
    image = Image([Layer([File("big/data", data)])])
    with Registry() as reg, FaultProxy("127.0.0.1", reg.port) as bad:
        images.push_image(reg, REPO, "v1", image)
        [digest] = _layer_digests(reg)
        size = len(image.layers[0].blob)
        bad.add_fault(f"/blobs/{digest}", "corrupt", times=None,
                      offset={"header": 0, "early": size // 5, "late": size - 10}[where])
        bad.add_fault(f"/blobs/{digest}", "slow", times=None, rate=size)   # a second
        env = _user_home(tmp_path, _mirror_conf(reg, bad.host))
        run = assert_ok(_pull(f"{reg.host}/{REPO}:v1", tmp_path / "root", env=env))
    assert [e["source"] for e in run.events if e["event"] == "source-failed"] == [bad.host]
    assert [w for w in _served(run)[reg.host] if "layer" in w] == [f"layer {digest}"]
    assert (tmp_path / "root/app/big/data").read_bytes() == data


def test_a_mirror_serving_a_broken_tag_manifest_is_passed_over(upstream, tmp_path):
    with FaultProxy("127.0.0.1", upstream.port) as bad:
        bad.add_fault("/manifests/v1", "corrupt", times=None, offset=0)
        env = _user_home(tmp_path, _mirror_conf(upstream, bad.host))
        run = assert_ok(_pull(f"{upstream.host}/{REPO}:v1", tmp_path / "root", env=env))
    assert f"{upstream.host}/{REPO}: manifest v1" in _served(run)[upstream.host]
    assert [e["reason"] for e in run.events if e["event"] == "source-failed"] == \
        ["a manifest that is no JSON object"]
