import pytest

from dkr.testing.registry import Registry


@pytest.fixture(scope="session")
def registry():
    """A real docker-registry on loopback, shared by the tests (each uses its own repos)."""
    with Registry() as reg:
        yield reg


@pytest.fixture
def image_root(tmp_path):
    return tmp_path / "machines"
