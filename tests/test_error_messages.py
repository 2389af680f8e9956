"""Errors that say what to do, and the stable ``kind`` of each in the --json error event.

Each failure is met for real: a registry on loopback (plain HTTP, with a login,
behind the fault proxy), a name that cannot resolve, a file system that fills up.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import signal

import pytest
from helpers import assert_ok, run_dkr
from reliability_helpers import BlobLayer, DkrProcess, error_lines, need

from dkr.store.imagelock import ImageLock
from dkr.testing import images, loopfs
from dkr.testing.faultproxy import FaultProxy
from dkr.testing.images import File, Image, Layer
from dkr.testing.registry import Registry, free_port

RETRY_LINE = re.compile(r"trying again in [0-9.]+ s \(attempt \d+ of \d+")


@pytest.fixture(scope="module")
def open_registry():
    """A registry anyone may pull from, with one small image."""
    with Registry() as reg:
        images.push_image(reg, "msg/img", "1", Image([Layer([File("hello", b"hi")])]))
        yield reg


@pytest.fixture(scope="module")
def private_registry():
    with Registry(auth=("htpasswd", {"alice": "wonderland"})) as reg:
        images.push_image(reg, "msg/private", "1", Image([Layer([File("secret", b"s")])]))
        yield reg


@pytest.fixture
def home(tmp_path):
    """An environment whose auth files all live under tmp_path (none written yet)."""
    env = {**os.environ, "DOCKER_CONFIG": str(tmp_path / "docker"),
           "XDG_RUNTIME_DIR": str(tmp_path / "run"),
           "XDG_CONFIG_HOME": str(tmp_path / "config")}
    env.pop("REGISTRY_AUTH_FILE", None)
    for directory in ("docker", "run/containers", "config/containers"):
        (tmp_path / directory).mkdir(parents=True)
    return tmp_path, env


def pull(*args, env=None):
    return run_dkr("pull", "--json", "--backend", "dir", *args, env=env)


def failure(run, kind: str) -> str:
    """The one error line of a failed run, after checking its --json error event's kind."""
    assert run.rc != 0, run.err
    assert "Traceback" not in run.err, run.err
    [line] = error_lines(run.err)
    [event] = [e for e in run.events if e["event"] == "error"]
    assert event["kind"] == kind, (event, run.err)
    assert event["message"] in line
    return line


# --- the messages -----------------------------------------------------------------------

def test_a_plain_http_registry_names_insecure(open_registry, image_root):
    line = failure(pull("--image-root", image_root, f"{open_registry.host}/msg/img:1"), "tls")
    assert f"{open_registry.host} answers plain HTTP" in line, line
    assert "--insecure" in line and "--tls-verify=false" in line, line
    # ... and what it says works.
    assert_ok(pull("--insecure", "--image-root", image_root, f"{open_registry.host}/msg/img:1"))


def test_a_name_that_does_not_resolve_fails_without_retries(image_root):
    run = pull("--image-root", image_root, "--retries", "4", "registry.dkr-test.invalid/msg/img:1")
    line = failure(run, "network")
    assert "Could not resolve host: registry.dkr-test.invalid" in line, line
    assert "check the registry's name" in line, line
    assert not RETRY_LINE.search(run.err), run.err
    assert "gave up after" not in line


def test_a_host_that_refuses_is_still_tried_again(image_root):
    """The other side of the test above: a connection refused may be a registry
    restarting, and is tried again."""
    run = pull("--image-root", image_root, "--retries", "1", f"127.0.0.1:{free_port()}/msg/img:1")
    line = failure(run, "network")
    assert len(RETRY_LINE.findall(run.err)) == 1, run.err
    assert "gave up after 2 attempts" in line, line


def test_a_cut_download_says_the_next_pull_resumes_it(image_root):
    blob = random.Random(7).randbytes(2 << 20)
    with Registry() as reg, FaultProxy("127.0.0.1", reg.port) as proxy:
        images.push_image(reg, "msg/big", "1", Image([Layer([File("big", blob)], "none")]))
        proxy.add_fault(r"/blobs/sha256:", "reset_after", times=None, bytes=1 << 20)
        # Streamed into its extractor (the base layer), the blob is not kept...
        run = pull("--insecure", "--retries", "0", "--image-root", image_root,
                   f"{proxy.host}/msg/big:1")
        line = failure(run, "network")
        assert re.search(r"the next pull starts this download again \(--spool-all", line), line
        # ... spooled, it is.
        run = pull("--insecure", "--retries", "0", "--image-root", image_root, "--spool-all",
                   f"{proxy.host}/msg/big:1")
        line = failure(run, "network")
        assert re.search(r"the [0-9.]+ [kM]B downloaded so far are kept: "
                         r"the next pull resumes from there", line), line

        proxy.clear_faults()
        proxy.clear_log()
        assert_ok(pull("--insecure", "--image-root", image_root, f"{proxy.host}/msg/big:1"))
        [layer_get] = [e for e in proxy.log_for(r"/blobs/sha256:") if e.bytes_sent > 10000]
        assert re.fullmatch(r"bytes=[1-9]\d*-", layer_get.range or ""), layer_get
    assert (image_root / "big" / "big").read_bytes() == blob


def test_a_reference_by_digest_prints_with_an_at(open_registry, image_root):
    digest = "sha256:" + "0" * 64
    run = pull("--insecure", "--image-root", image_root,
               f"{open_registry.host}/msg/img@{digest}", "pinned")
    line = failure(run, "not-found")
    assert f"{open_registry.host}/msg/img@{digest}: manifest unknown" in line, line
    assert f"img:{digest}" not in line


def test_a_login_needed_names_the_ways_to_log_in(private_registry, image_root, home):
    _, env = home
    line = failure(pull("--insecure", "--image-root", image_root,
                        f"{private_registry.host}/msg/private:1", env=env), "auth")
    assert "requires a login" in line, line
    for way in (f"dkr login {private_registry.host}", "podman login", "docker login",
                "--creds"):
        assert way in line, (way, line)


def test_a_batch_error_names_its_image_once(open_registry, image_root, tmp_path):
    missing = f"{open_registry.host}/msg/nosuch:1"
    batch = tmp_path / "batch"
    batch.write_text(f"{missing}\n{open_registry.host}/msg/img:1 fine\n")
    run = pull("--insecure", "--image-root", image_root, "--batch", batch)
    assert run.rc == 1, run.err
    [line] = error_lines(run.err)
    assert line.count("msg/nosuch") == 1, line
    assert line == f"dkr: error: {missing}: manifest unknown (no such tag or digest)"
    [event] = [e for e in run.events if e["event"] == "error"]
    assert (event["reference"], event["kind"]) == (missing, "not-found")
    assert (image_root / "fine" / "hello").read_bytes() == b"hi"


@pytest.mark.parametrize("make_unreadable", [
    lambda path: path.write_text("{not json"),
    lambda path: path.mkdir(),                    # read(2) fails: EISDIR, as root too
], ids=["invalid-json", "unreadable"])
def test_an_unreadable_auth_file_a_pull_does_not_need_is_a_warning(
        open_registry, private_registry, image_root, home, make_unreadable):
    tmp, env = home
    auth_file = tmp / "config" / "containers" / "auth.json"
    make_unreadable(auth_file)
    run = assert_ok(pull("--insecure", "--image-root", image_root,
                         f"{open_registry.host}/msg/img:1", env=env))
    assert re.search(rf"Cannot read credentials from {re.escape(str(auth_file))}: .*; "
                     r"going on without its logins", run.err), run.err
    assert (image_root / "img" / "hello").read_bytes() == b"hi"

    # A pull that needs a login says why it has none.
    line = failure(pull("--insecure", "--image-root", image_root,
                        f"{private_registry.host}/msg/private:1", env=env), "auth")
    assert "requires a login" in line, line
    assert f"cannot read credentials from {auth_file}" in line, line


def _unpacks_too_big():
    # Compressed to almost nothing, 48 MB unpacked: the blob fits, its tree does not.
    # A member named "sys": the message must not read it as a device's name.
    tar = Layer([File("sys", bytes(48 << 20))], "none").tar
    return BlobLayer(gzip.compress(tar), tar)


def _downloads_too_big():
    return Layer([File("sys", random.Random(3).randbytes(40 << 20))], "none")


@pytest.mark.parametrize("make_layer", [_unpacks_too_big, _downloads_too_big],
                         ids=["unpacking", "downloading"])
def test_a_full_disk_names_the_image_root_its_free_space_and_the_need(open_registry,
                                                                      make_layer):
    need(loopfs.unavailable_reason("ext4"))
    images.push_image(open_registry, "msg/huge", make_layer.__name__, Image([make_layer()]))
    with loopfs.loop_fs("ext4", "32M") as mount:
        root = mount / "machines"
        run = pull("--insecure", "--image-root", root,
                   f"{open_registry.host}/msg/huge:{make_layer.__name__}")
        line = failure(run, "disk-full")
    size = r"([0-9.]+) (bytes|[kMG]B)"
    found = re.search(rf"The image root {re.escape(str(root))} has {size} free now: this "
                      rf"pull needs more than the {size} free when it began", line)
    assert found, line
    # (what the root had before: less than the 32 MB file system, more than nothing)
    assert found.group(4) == "MB" and 1 < float(found.group(3)) < 32, line
    assert "(sys)" not in line and "--image-root" in line, line


def test_usage_errors_exit_2_with_kind_usage(image_root):
    run = pull("--v1", "--image-root", image_root, "some/name")
    assert run.rc == 2, run.err
    assert "--index-url" in failure(run, "usage")
    # Found by the argument parser, or by the command before it names any image: the
    # --json reader gets the error event too, and it is the only event.
    for wrong, said in ((["--jobs", "0", "some/name"], "--jobs: must be 1 to 1024"),
                        ([], "a REFERENCE (or --batch FILE) is required"),
                        (["--no-such-option", "some/name"], "unrecognized arguments")):
        run = pull("--image-root", image_root, *wrong)
        assert run.rc == 2, run.err
        assert said in failure(run, "usage")
        assert [e["event"] for e in run.events] == ["error"], run.events
    run = pull("--image-root", image_root, "Not A Reference")
    assert run.rc == 2 and "invalid reference" in failure(run, "usage")


# --- each kind in the --json error event --------------------------------------------------

def test_a_corrupt_blob_is_of_kind_digest(image_root):
    with Registry() as reg, FaultProxy("127.0.0.1", reg.port) as proxy:
        images.push_image(reg, "msg/img", "1", Image([Layer([File("x", b"x" * 5000)])]))
        proxy.add_fault(r"/blobs/sha256:", "corrupt", times=None, offset=10)
        line = failure(pull("--insecure", "--retries", "0", "--image-root", image_root,
                            f"{proxy.host}/msg/img:1"), "digest")
    assert "does not match its digest" in line, line


def test_a_layer_that_is_no_tar_is_of_kind_layer(open_registry, image_root):
    data = b"hello, I am not a tar archive\n" * 100
    images.push_image(open_registry, "msg/notar", "1",
                      Image([BlobLayer(gzip.compress(data), data)]))
    failure(pull("--insecure", "--image-root", image_root,
                 f"{open_registry.host}/msg/notar:1"), "layer")


def test_a_machine_in_use_is_of_kind_in_use(open_registry, image_root):
    images.push_image(open_registry, "msg/other", "1", Image([Layer([File("other", b"o")])]))
    assert_ok(pull("--insecure", "--image-root", image_root, f"{open_registry.host}/msg/img:1",
                   "app"))
    with ImageLock(image_root / "app", "machine app", "app"):
        line = failure(pull("--insecure", "--force", "--image-root", image_root,
                            f"{open_registry.host}/msg/other:1", "app"), "in-use")
    assert "in use" in line, line


def test_a_machine_of_another_image_is_of_kind_exists(open_registry, image_root):
    images.push_image(open_registry, "msg/other", "1", Image([Layer([File("other", b"o")])]))
    assert_ok(pull("--insecure", "--image-root", image_root, f"{open_registry.host}/msg/img:1",
                   "app"))
    failure(pull("--insecure", "--image-root", image_root, f"{open_registry.host}/msg/other:1",
                 "app"), "exists")


def test_a_rejecting_policy_is_of_kind_policy(open_registry, image_root, tmp_path):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"default": [{"type": "reject"}]}))
    failure(pull("--insecure", "--signature-policy", policy, "--image-root", image_root,
                 f"{open_registry.host}/msg/img:1"), "policy")


def test_a_broken_registries_conf_is_of_kind_config(open_registry, image_root, tmp_path):
    conf = tmp_path / "registries.conf"
    conf.write_text("this is [not toml\n")
    failure(pull("--insecure", "--registries-conf", conf, "--image-root", image_root,
                 f"{open_registry.host}/msg/img:1"), "config")


def test_a_stopped_pull_is_of_kind_interrupted(image_root):
    blob = random.Random(5).randbytes(4 << 20)
    with Registry() as reg, FaultProxy("127.0.0.1", reg.port) as proxy:
        images.push_image(reg, "msg/slow", "1", Image([Layer([File("big", blob)], "none")]))
        proxy.add_fault(r"/blobs/sha256:", "slow", times=None, rate=256 * 1024)
        proc = DkrProcess("pull", "--json", "--insecure", "--backend", "dir", "--image-root",
                          image_root, f"{proxy.host}/msg/slow:1")
        try:
            proc.wait_event(lambda e: e["event"] == "layer-start")
            proc.signal(signal.SIGTERM)
            rc, err = proc.finish()
        finally:
            proc.stop()
    assert rc == 128 + signal.SIGTERM, err
    assert error_lines(err) == ["dkr: error: interrupted by SIGTERM"], err
    [event] = [e for e in proc.events if e["event"] == "error"]
    assert event["kind"] == "interrupted", event


def test_a_certificate_no_trusted_ca_signed_is_of_kind_tls(image_root):
    with Registry(tls=True) as reg:
        images.push_image(reg, "msg/img", "1", Image([Layer([File("hello", b"hi")])]))
        line = failure(pull("--image-root", image_root, f"{reg.host}/msg/img:1"), "tls")
        assert "--ca-file" in line, line
        assert_ok(pull("--ca-file", reg.ca_file, "--image-root", image_root,
                       f"{reg.host}/msg/img:1"))
