"""Overlay machines after a reboot: `dkr list` says a machine is not mounted, the
boot unit dkr ships mounts it again, and a real systemd-nspawn then runs it."""

from __future__ import annotations

import json
import shlex
from importlib import resources

import pytest
from helpers import assert_ok, pull, run_dkr
from nspawn_tree import NSPAWN, nspawn, os_layer, running

from dkr.testing import images
from dkr.testing.images import File, Image, Layer


def unit(name: str) -> str:
    return (resources.files("dkr") / "data" / name).read_text()


def states(root) -> dict[str, str]:
    listed = json.loads(assert_ok(run_dkr("list", "--image-root", root, "--json")).out)
    return {row["local"]: row["state"] for row in listed}


def table_states(root) -> dict[str, str]:
    lines = assert_ok(run_dkr("list", "--image-root", root)).out.splitlines()
    start = lines[0].index("STATE")
    return {line.split()[0]: line[start:].strip() for line in lines[1:]}


def test_the_unit_mounts_every_machine_before_machines_start():
    text = unit("dkr-mount.service")
    assert "ExecStart=/usr/local/bin/dkr mount --all\n" in text
    assert "Before=machines.target" in text and "WantedBy=machines.target" in text
    assert "Type=oneshot" in text and "RemainAfterExit=yes" in text
    drop_in = unit("systemd-nspawn@.service.d-dkr-mount.conf")
    assert "After=dkr-mount.service" in drop_in and "Wants=dkr-mount.service" in drop_in


@pytest.mark.skipif(NSPAWN is None, reason="needs systemd-nspawn (install.sh installs it)")
def test_after_a_reboot_the_unit_mounts_and_nspawn_runs_the_machine(registry, image_root):
    images.push_image(registry, "boot/os", "latest",
                      Image([os_layer(), Layer([File("hello", b"from the image\n")])],
                            config={"Cmd": ["/bin/sh", "-c", "echo $(read l < /hello; "
                                                              "echo $l) > /out/said"]}))
    for local in ("app", "other"):
        assert_ok(pull(registry, "boot/os", image_root, "--backend", "overlay", local=local))
    try:
        assert states(image_root) == {"app": "ready", "other": "ready"}
        with running(image_root / "app"):
            assert states(image_root)["app"] == "in use"

        assert_ok(run_dkr("umount", "--image-root", image_root, "--all"))    # as a reboot
        assert table_states(image_root) == {"app": "not mounted", "other": "not mounted"}
        refused = nspawn(image_root / "app")
        refused.communicate(timeout=60)
        assert refused.returncode != 0        # nspawn finds an empty directory

        [command] = [line.split("=", 1)[1] for line in unit("dkr-mount.service").splitlines()
                     if line.startswith("ExecStart=")]
        argv = shlex.split(command)
        assert argv[0].endswith("/dkr")
        booted = run_dkr(*argv[1:], "--image-root", image_root)
        assert booted.rc == 0 and "Traceback" not in booted.err, booted.err
        assert states(image_root) == {"app": "ready", "other": "ready"}

        proc = nspawn(image_root / "app")
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert (image_root / "app" / "out" / "said").read_text() == "from the image\n"
    finally:
        assert_ok(run_dkr("remove", "--image-root", image_root, "app", "other"))


def test_list_shows_a_missing_tree_and_an_unreadable_record(registry, image_root):
    images.push_image(registry, "boot/small", "latest", Image([Layer([File("x", b"x")])]))
    for local in ("gone", "broken", "fine"):
        assert_ok(pull(registry, "boot/small", image_root, "--backend", "dir", local=local))
    (image_root / "gone").rename(image_root / "elsewhere")
    (image_root / ".dkr" / "machines" / "broken.json").write_text("{not json")
    assert table_states(image_root) == {"broken": "record unreadable", "fine": "ready",
                                        "gone": "tree missing"}
