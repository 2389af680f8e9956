"""The v1 test server must speak v1 faithfully and fail on demand."""

import gzip
import http.client
import io
import json
import ssl
import tarfile
import threading
import urllib.error
import urllib.request

import pytest

from dkr.testing.v1server import ANCESTRY_FAULTS, MAX_ANCESTRY, STEPS, V1Server

NAME = "library/test"


def make_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


BASE = make_tar({"etc/os-release": b"ID=test\n"})
TOP = make_tar({"bin/hello": b"#!/bin/sh\necho hi\n"})


@pytest.fixture
def srv():
    with V1Server() as server:
        server.ids = server.add_image(NAME, "latest", [BASE, TOP])
        yield server


def get(srv, url, headers=None):
    """(status, headers, body) for a GET, trusting only the server's CA."""
    ctx = ssl.create_default_context(cafile=srv.ca_file)
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers, e.read()


def index(srv, name=NAME):
    return get(srv, f"{srv.index_url}/v1/repositories/{name}/images", {"X-Docker-Token": "true"})


def token_of(srv):
    status, headers, _ = index(srv)
    assert status == 200
    return "Token " + headers["X-Docker-Token"]


def reg(srv, path, token=None):
    return get(srv, f"{srv.registry_url}{path}", {"Authorization": token} if token else {})


def test_happy_path(srv):
    base_id, top_id = srv.ids
    status, headers, body = index(srv)
    assert status == 200
    token = headers["X-Docker-Token"]
    assert token.startswith("signature=") and f'repository="{NAME}"' in token
    assert token.endswith(",access=read")
    endpoint = headers["X-Docker-Endpoints"]
    assert endpoint == srv.registry_host != srv.index_host
    assert {i["id"] for i in json.loads(body)} == {base_id, top_id}

    auth = "Token " + token
    base = f"https://{endpoint.split(',')[0]}"
    status, _, body = get(srv, f"{base}/v1/repositories/{NAME}/tags/latest", {"Authorization": auth})
    assert (status, json.loads(body)) == (200, top_id)

    status, _, body = get(srv, f"{base}/v1/images/{top_id}/ancestry", {"Authorization": auth})
    assert json.loads(body) == [top_id, base_id]

    for image_id, parent, layer in ((top_id, base_id, TOP), (base_id, None, BASE)):
        _, _, body = get(srv, f"{base}/v1/images/{image_id}/json", {"Authorization": auth})
        meta = json.loads(body)
        assert meta["id"] == image_id and meta.get("parent") == parent and "config" in meta
        status, headers, body = get(srv, f"{base}/v1/images/{image_id}/layer",
                                    {"Authorization": auth})
        assert status == 200 and body == layer
        assert headers["Content-Length"] == str(len(layer))

    registry_requests = [r for r in srv.requests if r.server == "registry"]
    assert len(registry_requests) == 6
    assert all(r.headers["authorization"] == auth for r in registry_requests)
    assert srv.requests[0].headers["X-Docker-Token"] == "true"


def test_ids_deterministic_and_gzip_layers():
    with V1Server() as a, V1Server() as b:
        ids = a.add_image(NAME, "latest", [BASE, TOP])
        assert ids == b.add_image(NAME, "latest", [BASE, TOP])
        assert all(len(i) == 64 and int(i, 16) >= 0 for i in ids)
        gz_ids = a.add_image(NAME, "gz", [BASE], gzip_layers=True)
        assert gz_ids[0] != ids[0]
        status, _, body = reg(a, f"/v1/images/{gz_ids[0]}/layer", token_of(a))
        assert status == 200 and body[:2] == b"\x1f\x8b" and gzip.decompress(body) == BASE


def test_keep_alive_and_content_length(srv):
    ctx = ssl.create_default_context(cafile=srv.ca_file)
    conn = http.client.HTTPSConnection("localhost", int(srv.registry_host.split(":")[1]),
                                       context=ctx, timeout=10)
    auth = token_of(srv)
    try:
        for image_id in srv.ids:
            conn.request("GET", f"/v1/images/{image_id}/json", headers={"Authorization": auth})
            resp = conn.getresponse()
            assert resp.status == 200 and resp.getheader("Content-Length")
            resp.read()
    finally:
        conn.close()
    assert sum(r.server == "registry" for r in srv.requests) == 2


def test_registry_requires_token(srv):
    top = srv.ids[-1]
    assert reg(srv, f"/v1/images/{top}/json")[0] == 401
    assert reg(srv, f"/v1/images/{top}/json", "Token signature=forged")[0] == 401
    # A token is scoped to the repository it was issued for.
    other = srv.add_image("other/repo", "latest", [make_tar({"x": b"x"})])
    auth = token_of(srv)
    assert reg(srv, "/v1/repositories/other/repo/tags/latest", auth)[0] == 401
    assert reg(srv, f"/v1/images/{other[0]}/layer", auth)[0] == 401
    assert reg(srv, f"/v1/images/{'0' * 64}/json", auth)[0] == 404
    srv.require_token = False
    assert reg(srv, f"/v1/images/{top}/json")[0] == 200


def test_index_without_token_request_and_unknown_repo(srv):
    status, headers, _ = get(srv, f"{srv.index_url}/v1/repositories/{NAME}/images")
    assert status == 200 and "X-Docker-Token" not in headers
    assert index(srv, "nobody/here")[0] == 404
    assert reg(srv, f"/v1/repositories/{NAME}/tags/nope", token_of(srv))[0] == 404


def test_index_header_knobs(srv):
    srv.omit_endpoints = True
    _, headers, _ = index(srv)
    assert "X-Docker-Endpoints" not in headers and "X-Docker-Token" in headers
    srv.omit_endpoints, srv.endpoints = False, f"bad host!,{srv.registry_host}"
    assert index(srv)[1]["X-Docker-Endpoints"] == f"bad host!,{srv.registry_host}"
    srv.omit_token = True
    assert "X-Docker-Token" not in index(srv)[1]


@pytest.mark.parametrize("step", STEPS)
def test_status_at_each_step(srv, step):
    srv.status[step] = 500
    auth = token_of(srv) if step != "images" else None
    top = srv.ids[-1]
    path = {"tags": f"/v1/repositories/{NAME}/tags/latest",
            "ancestry": f"/v1/images/{top}/ancestry",
            "json": f"/v1/images/{top}/json",
            "layer": f"/v1/images/{top}/layer"}.get(step)
    if step == "images":
        srv.status.clear()  # token_of needed a healthy index; now break it
        srv.status["images"] = 404
        assert index(srv)[0] == 404
    else:
        assert reg(srv, path, auth)[0] == 500


def test_status_by_image_id_hits_only_that_image(srv):
    base, top = srv.ids
    srv.status[base] = 404
    auth = token_of(srv)
    assert reg(srv, f"/v1/images/{top}/layer", auth)[0] == 200
    assert reg(srv, f"/v1/images/{base}/layer", auth)[0] == 404


def test_tag_payload_overrides(srv):
    auth = token_of(srv)
    path = f"/v1/repositories/{NAME}/tags/latest"
    srv.payload["tags"] = "XYZ"
    assert reg(srv, path, auth)[2] == b'"XYZ"'
    srv.payload["tags"] = {"id": srv.ids[-1]}
    assert isinstance(json.loads(reg(srv, path, auth)[2]), dict)


@pytest.mark.parametrize("fault", ANCESTRY_FAULTS)
def test_ancestry_faults(srv, fault):
    base, top = srv.ids
    srv.ancestry_fault = fault
    _, _, body = reg(srv, f"/v1/images/{top}/ancestry", token_of(srv))
    chain = json.loads(body)
    if fault == "duplicate":
        assert len(set(chain)) < len(chain) and chain[0] == top
    elif fault == "empty":
        assert chain == []
    elif fault == "too_long":
        assert len(chain) == MAX_ANCESTRY + 1 == len(set(chain)) and chain[0] == top
    elif fault == "foreign_first":
        assert chain[0] != top and chain[1:] == [base]
    else:
        assert chain == [base, top]


@pytest.mark.parametrize("step", ["images", "tags", "ancestry", "json"])
def test_malformed_and_nul_json(srv, step):
    auth = token_of(srv)
    top = srv.ids[-1]
    fetch = {"images": lambda: index(srv),
             "tags": lambda: reg(srv, f"/v1/repositories/{NAME}/tags/latest", auth),
             "ancestry": lambda: reg(srv, f"/v1/images/{top}/ancestry", auth),
             "json": lambda: reg(srv, f"/v1/images/{top}/json", auth)}[step]
    srv.malformed.add(step)
    status, _, body = fetch()
    assert status == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(body)
    srv.malformed.clear()
    srv.nul_byte.add(step)
    body = fetch()[2]
    assert b"\x00" in body


def test_truncated_layer(srv):
    srv.truncate["layer"] = 100
    with pytest.raises(http.client.IncompleteRead):
        reg(srv, f"/v1/images/{srv.ids[-1]}/layer", token_of(srv))
    # The connection died, not the server.
    srv.truncate.clear()
    assert reg(srv, f"/v1/images/{srv.ids[-1]}/layer", token_of(srv))[2] == TOP


def test_delay_completes_and_close_interrupts():
    server = V1Server().start()
    try:
        top = server.add_image(NAME, "latest", [BASE, TOP])[-1]
        auth = token_of(server)
        server.delay[top] = 0.05
        assert reg(server, f"/v1/images/{top}/layer", auth)[2] == TOP
        server.delay[top] = 3600
        outcome = []

        def slow_pull():
            try:
                outcome.append(reg(server, f"/v1/images/{top}/layer", auth))
            except (http.client.HTTPException, OSError) as exc:
                outcome.append(exc)

        t = threading.Thread(target=slow_pull)
        t.start()
        # Wait until the stalled request is being answered, then pull the plug.
        while t.is_alive() and sum(r.path.endswith("/layer") for r in server.requests) < 2:
            t.join(0.01)
    finally:
        server.close()
    t.join(10)
    assert not t.is_alive()  # close() must not wait for the stalled layer
    assert isinstance(outcome[0], (http.client.IncompleteRead, OSError))
    assert sum(r.path.endswith("/layer") for r in server.requests) == 2
