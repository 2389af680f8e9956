"""The image's config as systemd-nspawn settings: ``IMAGE_ROOT/LOCAL.nspawn``.

``systemd-nspawn -D IMAGE_ROOT/LOCAL`` reads ``LOCAL.nspawn`` beside the
tree (systemd.nspawn(5)), as systemd's own ``importctl pull-oci`` writes it:
``[Exec] Boot=no``, ``Environment=`` per ``Env`` entry, ``Parameters=``
from ``Entrypoint`` + ``Cmd``, ``WorkingDirectory=`` (unless ``/``),
``User=`` (unless root), ``KillSignal=`` from ``StopSignal``. What has no
nspawn equivalent is named in a warning.

Quoting follows nspawn's parsers, not a shell's: ``Parameters=`` and
``Environment=`` are read by ``config_parse_strv``, which splits words with
``extract_first_word(EXTRACT_UNQUOTE|EXTRACT_RETAIN_ESCAPE)``: a word may be
made of '...' and "..." parts, a backslash is an ordinary character
everywhere, and nothing else is expanded (no ``$``, no ``%`` specifiers in
.nspawn files). A value cannot hold a newline at all (the file is read line
by line, with no escape for it): such an entry is left out, with a warning.
``WorkingDirectory=`` (``config_parse_path``) and ``User=``
(``config_parse_string``) take the rest of the line as it is.

Everything here is pure: config in, text and warnings out.
"""

from __future__ import annotations

import os
import secrets
import signal
from pathlib import Path

# The first line of every settings file dkr writes: a file without it is someone
# else's, and dkr neither replaces nor removes it.
HEADER = "# Written by dkr from the image's config; dkr replaces and removes it with the machine."

# Image config fields that nspawn has no setting for (or none that fits an
# image's meaning): a pull says that they are not applied.
UNMAPPED = {
    "ExposedPorts": "ports (nspawn's Port= needs a private network and a host port)",
    "Volumes": "volumes (use Bind= in the .nspawn file to give the machine a directory)",
    "Healthcheck": "the health check",
    "OnBuild": "ONBUILD triggers",
    "Memory": "the memory limit", "MemorySwap": "the memory limit",
    "CpuShares": "the CPU shares",
}

_PLAIN = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
             "@+=:,./-_")


def quote_word(word: str) -> str:
    """``word`` as one word for ``config_parse_strv`` (see the module docstring)."""
    if word and all(c in _PLAIN for c in word):
        return word
    parts, run = [], ""
    for c in word:
        if c == "'":
            if run:
                parts.append(f"'{run}'")
                run = ""
            parts.append('"\'"')
        else:
            run += c
    if run or not parts:
        parts.append(f"'{run}'")
    return "".join(parts)


def split_words(value: str) -> list[str]:
    """How ``config_parse_strv`` reads a value back into words (for the tests and
    for ``dkr inspect``'s readers)."""
    words, word, quote, started = [], "", None, False
    for c in value:
        if quote:
            if c == quote:
                quote = None
            else:
                word += c
        elif c in "'\"":
            quote, started = c, True
        elif c in " \t\n\r":
            if started:
                words.append(word)
            word, started = "", False
        else:
            word += c
            started = True
    if quote:
        raise ValueError(f"unbalanced quoting in {value!r}")
    if started:
        words.append(word)
    return words


def _signal_name(value) -> str | None:
    """A StopSignal ("SIGTERM", "TERM", "15") as nspawn's KillSignal= takes it."""
    text = str(value).strip()
    try:
        return signal.Signals(int(text)).name
    except ValueError:
        pass
    name = text.upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    return name if name in signal.Signals.__members__ else None


def _printable(text: str) -> bool:
    return text.isprintable()


def settings(image_config: dict) -> tuple[str, list[str]]:
    """The ``.nspawn`` text for an image config blob (OCI or Docker, v2 or v1),
    and a warning for each part that does not reach systemd."""
    config = image_config.get("config") or image_config.get("container_config") or {}
    if not isinstance(config, dict):
        config = {}
    warnings: list[str] = []
    lines = [HEADER, "", "[Exec]", "Boot=no"]

    for entry in _strings(config.get("Env"), "Env", warnings):
        if "=" not in entry or entry.startswith("="):
            warnings.append(f"Env entry {entry!r} is no NAME=VALUE assignment: left out")
        elif "\n" in entry or "\r" in entry or "\0" in entry:
            warnings.append(f"Env entry {entry.split('=', 1)[0]} has a line break in its "
                            "value, which a .nspawn file cannot hold: left out")
        else:
            lines.append(f"Environment={quote_word(entry)}")

    argv = (_strings(config.get("Entrypoint"), "Entrypoint", warnings)
            + _strings(config.get("Cmd"), "Cmd", warnings))
    if any("\n" in word or "\r" in word or "\0" in word for word in argv):
        warnings.append("the command has a line break in an argument, which a .nspawn "
                        "file cannot hold: Parameters= left out (nspawn starts a shell)")
    elif argv:
        lines.append("Parameters=" + " ".join(quote_word(word) for word in argv))

    workdir = config.get("WorkingDir")
    if isinstance(workdir, str) and workdir.strip() and os.path.normpath(workdir) != "/":
        if not workdir.startswith("/") or not _printable(workdir) or workdir != workdir.strip():
            warnings.append(f"WorkingDir {workdir!r} is not an absolute path nspawn takes: "
                            "left out")
        else:
            lines.append(f"WorkingDirectory={os.path.normpath(workdir)}")

    user = config.get("User")
    if isinstance(user, str) and user.strip():
        name, _, group = user.partition(":")
        if not name or not _printable(user) or name != name.strip():
            warnings.append(f"User {user!r} is not a user nspawn takes: left out")
        elif name not in ("root", "0"):
            lines.append(f"User={name}")
        if group and name and group not in ("root", "0"):
            warnings.append(f"User {user!r} names a group, which nspawn cannot set apart "
                            "from the user's: the user's own groups apply")

    stop = config.get("StopSignal")
    if stop not in (None, ""):
        name = _signal_name(stop)
        if name is None:
            warnings.append(f"StopSignal {stop!r} is no signal nspawn knows: left out")
        else:
            lines.append(f"KillSignal={name}")

    for field, what in UNMAPPED.items():
        if config.get(field):
            warnings.append(f"the image's {what} ({field}) has no equivalent in a .nspawn "
                            "file: not applied")
    return "\n".join(lines) + "\n", warnings


def _strings(value, field: str, warnings: list[str]) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):          # (a hand-made config may give a string)
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        warnings.append(f"{field} is not a list of strings: left out")
        return []
    return value


def is_ours(text: str) -> bool:
    return text.startswith(HEADER + "\n")


# --- the file beside the machine ------------------------------------------------------
# (Written under the machine's lock, as its tree is.)

def settings_path(root_path: Path, local: str) -> Path:
    return root_path / f"{local}.nspawn"


def _temp_prefix(local: str) -> str:
    # Hidden (machinectl and nspawn pass over dot files) and not a .dkr- name (gc
    # takes those for layers and machine trees).
    return f".#{local}.nspawn.tmp-"


def remove_leftovers(root_path: Path, local: str) -> None:
    """What a killed pull left of LOCAL's settings; the caller holds its machine lock."""
    start = _temp_prefix(local)
    for name in os.listdir(root_path):
        if name.startswith(start):
            try:
                os.unlink(root_path / name)
            except FileNotFoundError:
                pass


def prepare(root_path: Path, local: str, text: str) -> Path:
    """``text`` written and synced under a temp name beside the machine, for ``put``."""
    tmp = root_path / f"{_temp_prefix(local)}{secrets.token_hex(4)}"     # (gc knows the form)
    try:
        with open(tmp, "x") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        discard(tmp)
        raise
    return tmp


def discard(tmp: Path | None) -> None:
    if tmp is not None:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def read(root_path: Path, local: str) -> str | None:
    try:
        return settings_path(root_path, local).read_text(errors="replace")
    except (FileNotFoundError, IsADirectoryError):
        return None


def put(root_path: Path, local: str, tmp: Path | None) -> bool:
    """Put prepared settings (or, with None, none) in place of dkr's old ones.
    False, and ``tmp`` dropped, where LOCAL.nspawn is a file dkr did not write."""
    target = settings_path(root_path, local)
    old = read(root_path, local)
    if (old is not None and not is_ours(old)) or \
            (old is None and os.path.lexists(target)):
        discard(tmp)
        return False
    if tmp is None:
        remove(root_path, local)
    else:
        os.rename(tmp, target)
    return True


def remove(root_path: Path, local: str) -> None:
    """Remove LOCAL.nspawn if dkr wrote it."""
    old = read(root_path, local)
    if old is not None and is_ours(old):
        settings_path(root_path, local).unlink(missing_ok=True)
