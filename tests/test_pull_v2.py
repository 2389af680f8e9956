"""End-to-end v2 pulls against a real registry, checked against skopeo + umoci."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
import types

import pytest
from helpers import assert_clean_failure, assert_ok, pull, run_dkr
from reliability_helpers import DkrProcess

from dkr.testing import images
from dkr.testing.faultproxy import FaultProxy
from dkr.testing.images import Dir, File, Image, Layer
from dkr.testing.oracle import diff_trees, tree_snapshot, umoci_unpack
from dkr.testing.registry import Registry
from dkr.testing.tokenserver import TokenServer


def _oracle_tree(registry, repo, ref, tmp_path, platform=None):
    rootfs = umoci_unpack(registry, repo, ref, tmp_path / "oracle", platform=platform)
    return tree_snapshot(rootfs)


@pytest.mark.parametrize("fmt", ["oci", "docker"])
def test_sample_image_matches_umoci(registry, image_root, tmp_path, fmt):
    repo = f"oracle/sample-{fmt}"
    images.push_image(registry, repo, "v1", images.sample_image(format=fmt))
    assert_ok(pull(registry, f"{repo}:v1", image_root, "--backend", "dir"))
    ours = tree_snapshot(image_root / f"sample-{fmt}")
    assert diff_trees(_oracle_tree(registry, repo, "v1", tmp_path), ours, "umoci", "dkr") == []


def test_sample_expectations_hold(registry, image_root):
    images.push_image(registry, "expect/sample", "latest", images.sample_image())
    assert_ok(pull(registry, "expect/sample", image_root, "--backend", "dir"))
    machine = image_root / "sample"
    snap = tree_snapshot(machine)
    expected = images.sample_expectations()
    for path in expected["absent"]:
        assert not os.path.lexists(machine / path), path
    assert os.stat(machine / "usr/bin/su").st_mode & 0o7777 == 0o4755
    assert os.readlink(machine / "lib") == "/usr/lib"
    assert os.getxattr(machine / "etc/xattrs", "user.comment") == b"hello"
    for group in expected["hardlinks"]:
        inodes = {os.lstat(machine / p).st_ino for p in group}
        assert len(inodes) == 1, group
    assert (machine / "var/cache/apt/fresh.bin").read_bytes() == b"new cache\n"
    assert snap  # the tree is not empty


def test_owner_and_mode_hold_in_a_set_group_id_directory(registry, image_root):
    """A set-group-ID directory from a lower layer hands its group to new files; the
    layer above says otherwise, and what it says is what the machine gets."""
    image = Image([
        Layer([Dir("shared", mode=0o2775, gid=50)]),
        Layer([File("shared/root", b"r", mode=0o640), File("shared/su", b"s", mode=0o4750, gid=7),
               File("shared/team", b"t", mode=0o664, gid=50)]),
    ])
    images.push_image(registry, "owners/setgid", "latest", image)
    assert_ok(pull(registry, "owners/setgid", image_root, "--backend", "dir", local="sg"))
    shared = image_root / "sg" / "shared"
    found = {name: (st.st_uid, st.st_gid, st.st_mode & 0o7777)
             for name in ("root", "su", "team") for st in [os.lstat(shared / name)]}
    assert found == {"root": (0, 0, 0o640), "su": (0, 7, 0o4750), "team": (0, 50, 0o664)}
    assert os.lstat(shared).st_mode & 0o7777 == 0o2775


def test_index_picks_requested_platform(registry, image_root, tmp_path):
    def image(arch):
        return Image([Layer([File("arch", arch.encode())])], arch=arch)
    images.push_index(registry, "multi/arch", "latest",
                      {"linux/amd64": image("amd64"), "linux/arm64": image("arm64")})
    assert_ok(pull(registry, "multi/arch", image_root, "--platform", "linux/arm64",
                   "--backend", "dir", local="arm"))
    assert (image_root / "arm" / "arch").read_bytes() == b"arm64"
    assert_ok(pull(registry, "multi/arch", image_root, "--platform", "linux/amd64",
                   "--backend", "dir", local="amd"))
    assert (image_root / "amd" / "arch").read_bytes() == b"amd64"
    oracle = _oracle_tree(registry, "multi/arch", "latest", tmp_path, platform="linux/arm64")
    assert diff_trees(oracle, tree_snapshot(image_root / "arm")) == []
    failed = pull(registry, "multi/arch", image_root, "--platform", "linux/s390x",
                  "--backend", "dir", local="s390")
    assert_clean_failure(failed, image_root, r"no image for platform linux/s390x.*amd64", "s390")


def test_an_index_entry_without_a_platform_is_taken_when_nothing_matches_better(
        registry, image_root):
    def image(name):
        return Image([Layer([File("which", name.encode())])])
    plain, arm = image("plain"), image("arm64").with_platform("linux/arm64")
    for img in (plain, arm):
        images.push_image(registry, "multi/bare", None, img)
    entry = {k: v for k, v in plain.descriptor().items() if k != "platform"}
    for tag, entries in (("bare", [entry]), ("both", [entry, arm.descriptor()])):
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                 "manifests": entries}
        registry.push_manifest("multi/bare", tag, json.dumps(index).encode(), index["mediaType"])
    for tag, platform, expected in (("bare", "linux/amd64", b"plain"),
                                    ("both", "linux/arm64", b"arm64"),
                                    ("both", "linux/amd64", b"plain")):
        local = f"{tag}-{platform.replace('/', '-')}"
        run = assert_ok(pull(registry, f"multi/bare:{tag}", image_root, "--platform", platform,
                             "--backend", "dir", "--json", local=local))
        assert (image_root / local / "which").read_bytes() == expected
        [resolved] = [e for e in run.events if e["event"] == "resolved"]
        assert resolved["platform"] == platform
    # Its config says what it is: an amd64 image is no arm64 one.
    wrong = pull(registry, "multi/bare:bare", image_root, "--platform", "linux/arm64",
                 "--backend", "dir", local="wrong")
    assert_clean_failure(wrong, image_root, r"no image for platform linux/arm64 \(the index "
                                            r"entry without a platform is linux/amd64\)", "wrong")


@pytest.fixture
def index_proxy(registry):
    """Serves made-up indexes in front of the registry (it stores no index naming
    manifests it lacks)."""
    host, port = registry.host.split(":")
    with FaultProxy(host, int(port)) as proxy:
        def serve(repo, index):
            proxy.add_fault(f"/{repo}/manifests/latest", "status", times=None, code=200,
                            body=json.dumps(index).encode(),
                            headers={"Content-Type": index["mediaType"]})
        proxy.serve = serve
        yield proxy


def test_an_index_is_read_for_our_platform_only(registry, index_proxy, image_root):
    """Entries we would never take do not fail the pull: an artifact (an SBOM, with
    artifactType) and entries in sha512, which dkr does not hash with, for another
    platform or ranked below the one we take. An image entry may name its config's
    type as artifactType."""
    amd = Image([Layer([File("which", b"amd64")])])
    arm = Image([Layer([File("which", b"arm64/v8")])]).with_platform("linux/arm64/v8")
    for image in (amd, arm):
        images.push_image(registry, "multi/extras", None, image)

    def sha512_entry(platform):
        return {"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 100,
                "digest": "sha512:" + hashlib.sha512(platform.encode()).hexdigest(),
                "platform": images.parse_platform(platform)}
    sbom = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": "application/spdx+json", "size": 100,
            "digest": "sha256:" + hashlib.sha256(b"sbom").hexdigest()}
    typed = {**amd.descriptor(), "artifactType": "application/vnd.oci.image.config.v1+json"}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [sbom, sha512_entry("linux/s390x"), sha512_entry("linux/arm64"),
                           arm.descriptor(), typed]}
    index_proxy.serve("multi/extras", index)
    for platform, which in (("linux/amd64", b"amd64"), ("linux/arm64/v8", b"arm64/v8")):
        local = platform.replace("/", "-")
        assert_ok(pull(index_proxy, "multi/extras", image_root, "--backend", "dir",
                       "--platform", platform, local=local))
        assert (image_root / local / "which").read_bytes() == which
    for platform, message in (("linux/riscv64", r"no image for platform linux/riscv64 \(index "
                                                r"offers: linux/s390x, linux/arm64, "
                                                r"linux/arm64/v8, linux/amd64\)"),
                              ("linux/s390x", r"index entry: invalid digest 'sha512:.*' "
                                              r"\(sha512 digests are not supported")):
        failed = pull(index_proxy, "multi/extras", image_root, "--backend", "dir",
                      "--platform", platform, local="other")
        assert_clean_failure(failed, image_root, message, "other")


def test_what_a_server_says_cannot_break_the_error_line(registry, image_root):
    """A newline or a terminal escape in server text (here an index's platform) is
    printed escaped: the error stays one line, and the terminal obeys nothing."""
    image = Image([Layer([File("a", b"a")])])
    images.push_image(registry, "multi/odd", None, image)
    entry = image.descriptor({"os": "linux\ndkr: error: forged\x1b[2J",
                              "architecture": "s390x"})
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [entry]}
    registry.push_manifest("multi/odd", "latest", json.dumps(index).encode(), index["mediaType"])
    failed = pull(registry, "multi/odd", image_root, "--backend", "dir", "--json")
    assert_clean_failure(failed, image_root,                 # (and no second error line)
                         r"index offers: linux\\ndkr: error: forged\\x1b\[2J/s390x\)$", "odd")
    assert "\x1b" not in failed.err and failed.err.count("\n") == len(failed.err.splitlines())
    [error] = [e for e in failed.events if e["event"] == "error"]
    assert "linux\ndkr: error: forged" in error["message"]    # JSON keeps it exact, escaped


def test_an_arm_machine_takes_the_closest_older_arm_variant(registry, image_root):
    """A v7 CPU runs v6 and v5 code (and v5 only is what v6 finds); arm64 is another
    architecture."""
    def image(variant):
        return Image([Layer([File("which", variant.encode())])], arch="arm", variant=variant)
    images.push_index(registry, "multi/arm", "latest",
                      {"linux/arm/v5": image("v5"), "linux/arm/v6": image("v6")})
    for platform, expected in (("linux/arm/v7", b"v6"), ("linux/arm/v6", b"v6"),
                               ("linux/arm/v8", b"v6"), ("linux/arm/v5", b"v5")):
        local = platform.replace("/", "-")
        run = assert_ok(pull(registry, "multi/arm", image_root, "--platform", platform,
                             "--backend", "dir", "--json", local=local))
        assert (image_root / local / "which").read_bytes() == expected
        [resolved] = [e for e in run.events if e["event"] == "resolved"]
        assert resolved["platform"] == f"linux/arm/{expected.decode()}"
    failed = pull(registry, "multi/arm", image_root, "--platform", "linux/arm64",
                  "--backend", "dir", local="arm64")
    assert_clean_failure(failed, image_root, r"no image for platform linux/arm64", "arm64")


def test_an_image_for_another_platform_is_pulled_with_a_warning(registry, image_root):
    """Asked for by its own manifest, an arm64 image is what the user wants; dkr says
    that it may not run here and records what it is."""
    images.push_image(registry, "single/arm64", "latest",
                      Image([Layer([File("which", b"arm64")])]).with_platform("linux/arm64"))
    run = assert_ok(pull(registry, "single/arm64", image_root, "--platform", "linux/amd64",
                         "--backend", "dir", "--json", local="arm"))
    assert re.search(r"single/arm64: the image is for linux/arm64, not linux/amd64: it may "
                     r"not run here\.", run.err), run.err
    [resolved] = [e for e in run.events if e["event"] == "resolved"]
    assert resolved["platform"] == "linux/arm64"
    mine = assert_ok(pull(registry, "single/arm64", image_root, "--platform", "linux/arm64/v8",
                          "--backend", "dir", local="arm-v8"))
    assert "may not run here" not in mine.err


@pytest.mark.parametrize("os_name,arch,recorded,warned", [
    ("linux", "x" * 100_000, "linux/" + "x" * 58 + "…", True),
    ({"a": 1}, ["amd64"], "linux/amd64", False),
], ids=["long", "not-text"])
def test_what_a_config_says_its_platform_is_goes_into_the_record_with_care(
        registry, image_root, os_name, arch, recorded, warned):
    """Cut short where long, and taken for nothing where it is no text."""
    images.push_image(registry, "single/odd", "latest",
                      Image([Layer([File("f", b"f")])], os=os_name, arch=arch))
    run = assert_ok(pull(registry, "single/odd", image_root, "--platform", "linux/amd64",
                         "--backend", "dir", "--json", local="odd"))
    [resolved] = [e for e in run.events if e["event"] == "resolved"]
    assert resolved["platform"] == recorded
    assert ("may not run here" in run.err) == warned
    assert len(run.err) < 2000, len(run.err)


def test_a_bare_index_entry_for_an_older_arm_variant_suits_a_newer_arm(registry, index_proxy,
                                                                       image_root):
    """Its config is judged as an index entry naming that platform would be; a variant
    that is no text is no match, not a crash."""
    v6 = Image([Layer([File("which", b"v6")])], arch="arm", variant="v6")
    images.push_image(registry, "multi/bare-arm", None, v6)
    bare = {k: v for k, v in v6.descriptor().items() if k != "platform"}
    odd = {**v6.descriptor(), "platform": {"os": "linux", "architecture": "arm", "variant": 6}}
    index_proxy.serve("multi/bare-arm", {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [odd, bare]})
    run = assert_ok(pull(index_proxy, "multi/bare-arm", image_root, "--platform", "linux/arm/v7",
                         "--backend", "dir", "--json", local="v7"))
    assert (image_root / "v7" / "which").read_bytes() == b"v6"
    [resolved] = [e for e in run.events if e["event"] == "resolved"]
    assert resolved["platform"] == "linux/arm/v6"
    failed = pull(index_proxy, "multi/bare-arm", image_root, "--platform", "linux/arm/v5",
                  "--backend", "dir", local="v5")
    assert_clean_failure(failed, image_root, r"no image for platform linux/arm/v5 \(the index "
                                             r"entry without a platform is linux/arm/v6\)", "v5")


def test_second_pull_reuses_layers(registry, image_root):
    images.push_image(registry, "reuse/img", "latest", images.sample_image())
    first = assert_ok(pull(registry, "reuse/img", image_root, "--backend", "dir", "--json",
                           local="one"))
    second = assert_ok(pull(registry, "reuse/img", image_root, "--backend", "dir", "--json",
                            local="two"))
    assert [e["event"] for e in first.events].count("layer-done") == 3
    assert [e["event"] for e in second.events].count("skipped") == 3
    assert "layer-done" not in [e["event"] for e in second.events]
    assert second.err.count("already exists, skipping.") == 3
    (image_root / "two" / "etc" / "hostname").write_text("changed")
    assert (image_root / "one" / "etc" / "hostname").read_text() == "updated\n"


def test_existing_machine_needs_force(registry, image_root):
    images.push_image(registry, "force/img", "latest",
                      Image([Layer([File("version", b"1")])]))
    assert_ok(pull(registry, "force/img", image_root, "--backend", "dir"))
    images.push_image(registry, "force/img", "latest",
                      Image([Layer([File("version", b"2")])]))
    refused = pull(registry, "force/img", image_root, "--backend", "dir")
    assert_clean_failure(refused, image_root,
                         r"machine 'img' in .* holds sha256:\w+, this pull gives sha256:\w+: "
                         r"--force replaces the machine and discards changes made in it")
    assert (image_root / "img" / "version").read_bytes() == b"1"
    assert_ok(pull(registry, "force/img", image_root, "--backend", "dir", "--force"))
    assert (image_root / "img" / "version").read_bytes() == b"2"
    record = json.loads((image_root / ".dkr" / "machines" / "img.json").read_text())
    assert record["reference"].endswith("force/img:latest")


def test_wrong_diff_id_commits_nothing(registry, image_root):
    layer = Layer([File("a", b"real content")])
    image = Image([layer])
    image.config_json["rootfs"]["diff_ids"] = ["sha256:" + "0" * 64]
    images.push_image(registry, "bad/diffid", "latest", image)
    failed = pull(registry, "bad/diffid", image_root, "--backend", "dir")
    assert_clean_failure(failed, image_root, r"DiffID .* the config says sha256:0000", "diffid")
    assert not [p for p in image_root.iterdir() if p.name.startswith(".dkr-")]


def test_unknown_tag(registry, image_root):
    images.push_image(registry, "tags/img", "exists", Image([Layer([File("a", b"a")])]))
    failed = pull(registry, "tags/img:missing", image_root, "--backend", "dir", "--json")
    assert_clean_failure(failed, image_root, r"tags/img:missing: manifest unknown", "img")
    [error] = [e for e in failed.events if e["event"] == "error"]     # for scripts, too
    assert error["reference"] == f"{registry.host}/tags/img:missing"
    assert "manifest unknown" in error["message"]


@pytest.mark.parametrize("reference, message", [
    ("Upper/Case", r"bad repository name"),
    ("name:bad:tag", r"bad"),
    ("host:5000/name@sha256:123", r"bad digest"),
    ("host:5000/name@sha512:" + "a" * 128, r"sha512 digests are not supported, only sha256"),
    ("", r"empty"),
])
def test_bad_reference(image_root, reference, message):
    failed = run_dkr("pull", "--image-root", image_root, reference)
    assert_clean_failure(failed, image_root, message)


@pytest.mark.parametrize("local", ["../escape", ".dkr-abc", "a/b", "bad name", "x" * 65])
def test_bad_machine_name(registry, image_root, local):
    failed = pull(registry, "any/img", image_root, "--backend", "dir", local=local)
    assert_clean_failure(failed, image_root, r"invalid machine name")


def test_unreachable_registry(image_root):
    failed = run_dkr("pull", "--image-root", image_root, "--insecure", "--retries", "1",
                     "127.0.0.1:1/x/y")
    assert_clean_failure(failed, image_root, r"cannot reach registry 127.0.0.1:1: .*gave up after 2 attempts")


# --- authentication ---------------------------------------------------------------

@pytest.fixture(scope="module")
def htpasswd_registry():
    with Registry(auth=("htpasswd", {"alice": "wonderland"})) as reg:
        images.push_image(reg, "private/img", "latest", Image([Layer([File("secret", b"s")])]))
        yield reg


def test_basic_auth_without_credentials(htpasswd_registry, image_root):
    failed = pull(htpasswd_registry, "private/img", image_root, "--backend", "dir")
    assert_clean_failure(failed, image_root, r"requires a login.*--creds", "img")


def test_basic_auth_with_wrong_credentials(htpasswd_registry, image_root):
    failed = pull(htpasswd_registry, "private/img", image_root, "--backend", "dir",
                  "--creds", "alice:nope")
    assert_clean_failure(failed, image_root, r"refused", "img")


def test_basic_auth_with_creds(htpasswd_registry, image_root):
    assert_ok(pull(htpasswd_registry, "private/img", image_root, "--backend", "dir",
                   "--creds", "alice:wonderland"))
    assert (image_root / "img" / "secret").read_bytes() == b"s"


def test_basic_auth_from_docker_config(htpasswd_registry, image_root, tmp_path, monkeypatch):
    import base64
    config = tmp_path / "docker"
    config.mkdir()
    token = base64.b64encode(b"alice:wonderland").decode()
    (config / "config.json").write_text(json.dumps(
        {"auths": {htpasswd_registry.host: {"auth": token}}}))
    env = {**os.environ, "DOCKER_CONFIG": str(config)}
    run = run_dkr("pull", "--insecure", "--image-root", image_root, "--backend", "dir",
                  f"{htpasswd_registry.host}/private/img", env=env)
    assert_ok(run)


@pytest.fixture(scope="module")
def token_registry():
    with TokenServer(users={"bob": "builder"}, anonymous_pull=False) as tokens:
        with Registry(auth=("token", tokens)) as reg:
            images.push_image(reg, "team/app", "latest", images.sample_image())
            yield reg, tokens


def test_bearer_token_auth(token_registry, image_root, tmp_path):
    reg, tokens = token_registry
    anonymous = pull(reg, "team/app", image_root, "--backend", "dir")
    assert_clean_failure(anonymous, image_root, r"refused anonymous access|--creds", "app")
    before = len(tokens.requests)
    run = assert_ok(pull(reg, "team/app", image_root, "--backend", "dir", "--creds",
                         "bob:builder"))
    asked = tokens.requests[before:]
    assert asked and all(r.user == "bob" for r in asked)
    assert any("repository:team/app:pull" in str(r.query) for r in asked)
    for token in tokens.issued:
        assert token not in run.err and token not in run.out
    oracle = _oracle_tree(reg, "team/app", "latest", tmp_path)
    assert diff_trees(oracle, tree_snapshot(image_root / "app")) == []


@pytest.fixture(scope="module")
def flaky_token_server():
    """A registry whose token server sits behind a fault proxy; tokens live 2 s
    (dkr asks for a new one after 1)."""
    with TokenServer(expires_in=2) as tokens, FaultProxy("127.0.0.1", tokens.port) as proxy:
        realm = types.SimpleNamespace(realm=f"{proxy.url}/token", service=tokens.service,
                                      issuer=tokens.issuer, cert_path=tokens.cert_path,
                                      users=tokens.users)
        with Registry(auth=("token", realm)) as reg, \
                FaultProxy("127.0.0.1", reg.port) as front:
            image = Image([Layer([File("big", random.Random(5).randbytes(300_000))])])
            images.push_image(reg, "flaky/app", "latest", image)
            yield front, proxy, image


def test_a_token_server_that_is_busy_is_asked_again(flaky_token_server, image_root):
    front, token_proxy, _ = flaky_token_server
    token_proxy.add_fault("/token", "status", code=503, retry_after=1)
    run = assert_ok(pull(front, "flaky/app", image_root, "--backend", "dir"))
    assert re.search(r"token server 127\.0\.0\.1:\d+: server answered 503; trying again "
                     r"in 1\.0 s", run.err), run.err
    assert (image_root / "app" / "big").stat().st_size == 300_000


def test_a_token_refresh_cut_short_leaves_the_blob_download_alone(flaky_token_server,
                                                                   image_root):
    """The token runs out while the config is on its way; the refresh that the layer's
    GET needs breaks off mid-answer. That is the token's failure, retried on its own:
    the layer's download must not think its own bytes arrived."""
    front, token_proxy, image = flaky_token_server
    front.add_fault(f"/blobs/{image.config_digest}", "slow",          # 1.5 s
                    rate=len(image.config_bytes) / 1.5)
    asked = len(token_proxy.log)
    process = DkrProcess("pull", "--insecure", "--image-root", image_root, "--backend", "dir",
                         f"{front.host}/flaky/app")
    try:
        deadline = time.monotonic() + 30
        while len(token_proxy.log) == asked and time.monotonic() < deadline:
            time.sleep(0.01)
        token_proxy.add_fault("/token", "truncate_after", bytes=15)  # the next one: the refresh
        rc, err = process.finish()
    finally:
        process.stop()
    assert rc == 0, err
    assert re.search(r"token server .*; trying again", err), err     # the case at hand
    layer_gets = [e for e in front.log if e.method == "GET" and image.layers[0].digest in e.path]
    assert layer_gets and all(e.range is None for e in layer_gets), layer_gets
