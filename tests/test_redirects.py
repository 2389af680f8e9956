"""Blob redirects to another host: followed, and credentials stay behind."""

from __future__ import annotations

import pytest
from helpers import assert_ok, pull, storage_server

from dkr.testing import images
from dkr.testing.oracle import diff_trees, tree_snapshot
from dkr.testing.registry import Registry, free_port


@pytest.fixture
def redirecting_registry():
    port = free_port()
    with Registry(auth=("htpasswd", {"carol": "s3cret"}),
                  redirect_blobs_to=f"http://localhost:{port}/") as reg, \
            storage_server(reg, port) as seen:
        yield reg, seen


def test_blob_redirect_drops_authorization(redirecting_registry, image_root, tmp_path):
    reg, seen = redirecting_registry
    images.push_image(reg, "cdn/img", "latest", images.sample_image())
    assert_ok(pull(reg, "cdn/img", image_root, "--backend", "dir", "--creds", "carol:s3cret"))
    blob_gets = [(path, auth) for path, auth in seen if path.endswith("/data")]
    assert len(blob_gets) >= 4, seen                # config and three layers came from there
    assert all(auth is None for _, auth in blob_gets), blob_gets
    expected = tree_snapshot(_oracle(reg, tmp_path))
    assert diff_trees(expected, tree_snapshot(image_root / "img")) == []


def _oracle(reg, tmp_path):
    from dkr.testing.oracle import umoci_unpack
    return umoci_unpack(reg, "cdn/img", "latest", tmp_path / "oracle")
