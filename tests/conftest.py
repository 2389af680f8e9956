import json
import os
import tempfile

import pytest

from dkr.testing.registry import Registry

# Pulls obey the host's trust policy, which a developer's machine may make strict:
# every test that is not about the policy pulls under one that accepts anything
# (the policy tests name their own files).
if not os.environ.get("DKR_SIGNATURE_POLICY"):
    _accepting = os.path.join(tempfile.mkdtemp(prefix="dkr-test-policy-"), "policy.json")
    with open(_accepting, "w") as f:
        json.dump({"default": [{"type": "insecureAcceptAnything"}]}, f)
    os.environ["DKR_SIGNATURE_POLICY"] = _accepting


@pytest.fixture(scope="session")
def registry():
    """A real docker-registry on loopback, shared by the tests (each uses its own repos)."""
    with Registry() as reg:
        yield reg


@pytest.fixture
def image_root(tmp_path):
    return tmp_path / "machines"
