"""A minimal PEP 517 build backend for the example plugins in tests/: setup.cfg into a wheel.

Only what this example package needs (pure Python packages, [metadata] name,
version, description, license, [options] packages and install_requires,
[options.entry_points]); it exists so that the test installs offline with
nothing but pip.
"""

from __future__ import annotations

import base64
import configparser
import hashlib
import io
import re
import tarfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _config() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(HERE / "setup.cfg")
    return cfg


def _lines(value: str) -> list[str]:
    return [item.strip() for item in re.split(r"[\n,]", value) if item.strip()]


def _names(cfg) -> tuple[str, str, str]:
    name, version = cfg["metadata"]["name"], cfg["metadata"]["version"]
    return name, version, re.sub(r"[-_.]+", "_", name).lower()


def _metadata(cfg) -> str:
    meta = cfg["metadata"]
    lines = ["Metadata-Version: 2.1", f"Name: {meta['name']}", f"Version: {meta['version']}"]
    if "description" in meta:
        lines.append(f"Summary: {meta['description']}")
    if "license" in meta:
        lines.append(f"License: {meta['license']}")
    for requirement in _lines(cfg["options"].get("install_requires", "")):
        lines.append(f"Requires-Dist: {requirement}")
    return "\n".join(lines) + "\n"


def _entry_points(cfg) -> str:
    out = []
    if cfg.has_section("options.entry_points"):
        for group, value in cfg["options.entry_points"].items():
            out.append(f"[{group}]")
            out.extend(_lines(value))
            out.append("")
    return "\n".join(out)


def _package_files(cfg) -> list[Path]:
    files = []
    for package in _lines(cfg["options"]["packages"]):
        files.extend(sorted((HERE / package.replace(".", "/")).glob("*.py")))
    return files


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def get_requires_for_build_wheel(config_settings=None):
    return []


def get_requires_for_build_sdist(config_settings=None):
    return []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    cfg = _config()
    _, version, dist = _names(cfg)
    info = f"{dist}-{version}.dist-info"
    contents = {str(p.relative_to(HERE)): p.read_bytes() for p in _package_files(cfg)}
    contents[f"{info}/METADATA"] = _metadata(cfg).encode()
    contents[f"{info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: build_backend.py\n"
                                 b"Root-Is-Purelib: true\nTag: py3-none-any\n")
    contents[f"{info}/entry_points.txt"] = _entry_points(cfg).encode()
    record = [_record_line(name, data) for name, data in contents.items()]
    contents[f"{info}/RECORD"] = ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()
    filename = f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(Path(wheel_directory) / filename, "w", zipfile.ZIP_DEFLATED) as whl:
        for name, data in contents.items():
            whl.writestr(name, data)
    return filename


def build_sdist(sdist_directory, config_settings=None):
    cfg = _config()
    _, version, dist = _names(cfg)
    top = f"{dist}-{version}"
    filename = f"{top}.tar.gz"
    sources = [HERE / "setup.cfg", HERE / "pyproject.toml", HERE / "build_backend.py",
               *_package_files(cfg)]
    with tarfile.open(Path(sdist_directory) / filename, "w:gz") as tar:
        for path in sources:
            tar.add(path, arcname=f"{top}/{path.relative_to(HERE)}")
        pkg_info = _metadata(cfg).encode()
        entry = tarfile.TarInfo(f"{top}/PKG-INFO")
        entry.size = len(pkg_info)
        tar.addfile(entry, io.BytesIO(pkg_info))
    return filename
