"""A fleet behind one pull-through cache: many hosts, one upstream fetch per blob.

Eight dkr processes, each with its own image root (eight hosts), pull the
same batch at once through one cold cache (distribution in proxy mode) named
as the upstream's mirror; then eight more through the warm cache.
"""

from __future__ import annotations

import os
import re
import subprocess

from helpers import DKR, ELSEWHERE, Run

from dkr.testing import images
from dkr.testing.images import File, Image, Layer
from dkr.testing.registry import Registry

HOSTS = 8


def _batch(upstream: Registry) -> list[str]:
    """Three images of one repository that share their base layer. (Distribution's
    cache links a blob to the repository it fetched it for: a blob that images of
    two repositories share may come from the upstream once more for the second.)"""
    base = Layer([File("usr/lib/base", b"b" * 300_000)])
    refs = []
    for n in range(3):
        image = Image([base, Layer([File(f"app/{n}", bytes([n]) * (100_000 + n))])])
        images.push_image(upstream, "fleet/app", f"v{n}", image)
        refs.append(f"{upstream.host}/fleet/app:v{n}")
    return refs


def _requests(reg: Registry, since: int) -> list[tuple[str, str]]:
    """(request, user agent) of each request the registry answered since ``since``."""
    log = reg.log_path.read_text()[since:]
    return re.findall(r'"((?:GET|HEAD) \S+) HTTP/[\d.]+" \d+ .*"([^"]*)"$', log, re.MULTILINE)


def _fleet(tmp_path, name: str, batch_file, env) -> list[Run]:
    procs = [subprocess.Popen([DKR, "pull", "--image-root", tmp_path / f"{name}{n}",
                               "--backend", "dir", "--json", "--batch", batch_file],
                              cwd=ELSEWHERE, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for n in range(HOSTS)]
    runs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        runs.append(Run(proc.returncode, out, err))
    return runs


def test_a_fleet_pulls_through_one_cache(tmp_path):
    with Registry() as upstream:
        refs = _batch(upstream)
        batch_file = tmp_path / "batch"
        batch_file.write_text("".join(f"{ref} app{n}\n" for n, ref in enumerate(refs)))
        with Registry(proxy_of=upstream.url) as cache:
            conf = tmp_path / "registries.conf"
            conf.write_text(f'[[registry]]\nlocation = "{upstream.host}"\ninsecure = true\n'
                            f'[[registry.mirror]]\nlocation = "{cache.host}"\ninsecure = true\n')
            env = {**os.environ, "CONTAINERS_REGISTRIES_CONF": str(conf)}
            since = len(upstream.log_path.read_text())

            for wave in ("cold", "warm"):
                runs = _fleet(tmp_path, wave, batch_file, env)
                for run in runs:
                    assert run.rc == 0, run.err
                    served = {e["source"] for e in run.events if e["event"] == "source"}
                    assert served == {cache.host}, run.err
                    assert not [e for e in run.events if e["event"] == "source-failed"], run.err
                for n in range(HOSTS):
                    for m in range(3):
                        assert (tmp_path / f"{wave}{n}/app{m}/app/{m}").is_file()
                upstream_requests = _requests(upstream, since)
                # Only the cache reaches the upstream, never a host.
                assert all(agent.startswith("Go-http-client") for _, agent in upstream_requests), \
                    [r for r in upstream_requests if not r[1].startswith("Go-http-client")]
                blobs = [r for r, _ in upstream_requests if r.startswith("GET") and "/blobs/" in r]
                if wave == "cold":
                    assert blobs, "the cold cache fetched nothing from the upstream"
                else:
                    assert blobs == [], blobs          # warm: the upstream serves no blob
                since = len(upstream.log_path.read_text())
