"""The spool file's sink: what libcurl hands over in 16 KiB pieces is written
and announced in larger ones, and nothing is lost at the end."""

from __future__ import annotations

import os

from dkr.pull.spool import SPOOL_WRITE, SpoolSink


def test_pieces_are_gathered_before_they_are_written_and_announced(tmp_path):
    path = tmp_path / "blob"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK)
    sink = SpoolSink(fd, path)
    sink.readers.append(wake_w)
    pieces = [os.urandom(16384) for _ in range(100)]
    sizes = []
    try:
        for piece in pieces:
            assert sink.write(piece)
            sizes.append(os.fstat(fd).st_size)
        assert all(size % SPOOL_WRITE == 0 for size in sizes)
        assert os.read(wake_r, 1000) == b"!" * (len(pieces) * 16384 // SPOOL_WRITE)
        sink.flush()
        assert path.read_bytes() == b"".join(pieces)
        assert os.read(wake_r, 1000) == b"!"
    finally:
        for descriptor in (fd, wake_r, wake_w):
            os.close(descriptor)
