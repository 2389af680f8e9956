"""The C library, for the system calls Python's os module has no function for.

(statfs, renameat2, unshare, mount and umount2, prctl, syncfs, the new mount
API through syscall(2).) One handle, loaded once, for every module that needs one.
"""

from __future__ import annotations

import ctypes
import os

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

AT_FDCWD = -100


def os_error(what: str | None = None, path=None) -> OSError:
    """The OSError for the errno that the last failed call through ``libc`` left."""
    err = ctypes.get_errno()
    message = os.strerror(err) if what is None else f"{what}: {os.strerror(err)}"
    return OSError(err, message) if path is None else OSError(err, message, str(path))
