"""The Python API takes values as people write them (a platform as text, a login as a
pair, a path as str) and says which type it wanted when it cannot use one."""

from __future__ import annotations

import pytest

from dkr import api
from dkr.errors import DkrError
from dkr.registry.auth import Credentials
from dkr.registry.v2 import Platform
from dkr.testing import images
from dkr.testing.images import File, Image, Layer
from dkr.testing.registry import Registry


def _arch_image(arch: str) -> Image:
    return Image([Layer([File("arch", arch.encode())])], arch=arch)


@pytest.fixture(scope="module")
def locked():
    """A registry that wants a login, with an image for two platforms."""
    with Registry(auth=("htpasswd", {"alice": "wonderland"})) as reg:
        images.push_index(reg, "private/multi", "latest", {"linux/amd64": _arch_image("amd64"),
                                                           "linux/arm64": _arch_image("arm64")})
        yield reg


def test_platform_as_text_and_credentials_as_a_pair(locked, tmp_path):
    options = api.PullOptions(image_root=str(tmp_path / "m"), backend="dir", insecure=True,
                              platform="linux/arm64", credentials=("alice", "wonderland"))
    result = api.pull(f"{locked.host}/private/multi", "arm", options=options)
    assert result.path == str(tmp_path / "m" / "arm")
    assert (tmp_path / "m/arm/arch").read_bytes() == b"arm64"
    assert result.index_digest and result.index_digest != result.manifest_digest
    # The caller's options are left as given.
    assert options.platform == "linux/arm64" and options.credentials == ("alice", "wonderland")


def test_the_engines_own_types_still_do(locked, tmp_path):
    options = api.PullOptions(image_root=tmp_path / "m", backend="dir", insecure=True,
                              platform=Platform("linux", "amd64"),
                              credentials=Credentials("alice", "wonderland"))
    [result] = api.pull_batch([(f"{locked.host}/private/multi", "amd")], options=options)
    assert result.path == str(tmp_path / "m" / "amd")
    assert (tmp_path / "m/amd/arch").read_bytes() == b"amd64"


@pytest.mark.parametrize("field, value, wanted", [
    ("platform", 64, r"platform: want a str such as 'linux/arm64'.*not int"),
    ("platform", ("linux", "arm64"), r"platform: want a str .*not tuple"),
    ("credentials", "alice:wonderland", r"credentials: want a \(user, password\) tuple.*not str"),
    ("credentials", ("alice",), r"credentials: want a \(user, password\) pair of str"),
    ("credentials", ("alice", 7), r"credentials: want a \(user, password\) pair of str"),
    ("image_root", 3, r"image_root: want a str or pathlib.Path, not int"),
])
def test_a_value_of_another_type_is_a_type_error_naming_the_wanted_one(tmp_path, field, value,
                                                                       wanted):
    options = api.PullOptions(**{"image_root": tmp_path, "insecure": True, field: value})
    with pytest.raises(TypeError, match=wanted):
        api.pull("127.0.0.1:1/never/reached", options=options)
    assert not any(tmp_path.iterdir())            # refused before anything was made


def test_a_platform_text_that_does_not_parse_is_a_dkr_error(tmp_path):
    options = api.PullOptions(image_root=tmp_path, platform="arm64")
    with pytest.raises(DkrError, match=r"invalid --platform 'arm64': want OS/ARCH"):
        api.pull("127.0.0.1:1/never/reached", options=options)
