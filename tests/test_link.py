"""dkr over a real (virtual) link: a registry in a network namespace behind a shaped veth pair.

Every other test talks to 127.0.0.1; this one crosses an interface with a
rate limit, as a pull from a registry elsewhere does (dkr.testing.link).
"""

from __future__ import annotations

import random
import subprocess

import pytest
from helpers import assert_ok, pull
from reliability_helpers import need

from dkr.testing import images, link
from dkr.testing.oracle import diff_trees, tree_snapshot, umoci_unpack
from dkr.testing.registry import Registry


@pytest.fixture(scope="module")
def remote():
    need(link.unavailable_reason())
    with link.ShapedLink() as shaped:
        registry = Registry(link=shaped)
        try:
            images.push_image(registry, "link/sample", "latest", images.sample_image())
            yield shaped, registry
        finally:
            registry.stop()


def test_pull_over_a_shaped_link(remote, image_root, tmp_path):
    shaped, registry = remote
    assert not registry.host.startswith("127.")
    shaped.shape("20mbit")
    qdiscs = subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True).stdout
    assert "tbf" in qdiscs and "20Mbit" in qdiscs
    assert_ok(pull(registry, "link/sample", image_root, "--backend", "dir"))
    shaped.shape(None)
    oracle = tree_snapshot(umoci_unpack(registry, "link/sample", "latest", tmp_path / "o"),
                           include_root=False)
    assert diff_trees(oracle, tree_snapshot(image_root / "sample", include_root=False),
                      "umoci", "dkr") == []


def test_the_link_goes_to_the_layers_in_the_order_they_are_built(remote, image_root):
    """Over a link that the download fills, a stacked backend can build only the base
    layer first: its blob gets the link and streams into its extractor, the ones
    above wait (or run ahead while the link has room). The blobs therefore
    arrive in layer order, and most bytes never pass through the spool."""
    shaped, registry = remote
    layers = [images.Layer([images.File(f"l{n}", random.Random(n).randbytes(1_500_000))])
              for n in range(3)]
    images.push_image(registry, "link/ordered", "latest", images.Image(layers))
    shaped.shape("40mbit")
    try:
        run = assert_ok(pull(registry, "link/ordered", image_root, "--backend", "dir",
                             "--stage-ahead", "never", "--json"))
    finally:
        shaped.shape(None)
    done = [event for event in run.events if event["event"] == "download-done"]
    assert [event["digest"] for event in done] == [layer.digest for layer in layers]
    total = sum(event["size"] for event in done)
    assert sum(event["spooled"] for event in done) < total / 2, done
