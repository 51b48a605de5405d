"""Length-prefixed frames between a node and its worker processes (sans-IO).

A frame is an 8-byte big-endian length and that many bytes. The node and each worker
talk over a Unix socket pair; a job is two frames (kind, payload) one way and two
frames (status line, result) back. Nothing here touches a socket: the reader says
where the next bytes should land and is told how many did; the writer's helper says
which buffers are left after a partial send. So a large payload is received straight
into the buffer that becomes its frame (one copy, the kernel's), and sent from the
caller's buffer without joining it to its header.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from meshnet.errors import ProtocolError

LENGTH = struct.Struct("!Q")
#: Small frames are parsed out of this much buffer per receive; a larger frame gets a
#: buffer of its own.
SCRATCH_BYTES = 256 * 1024


def frame_buffers(frames: Sequence[Any]) -> list[Any]:
    """The buffers that send ``frames`` (bytes-like objects), none of them copied."""
    buffers: list[Any] = []
    for frame in frames:
        # bytes as they are (the usual small frame: no view to make); any other buffer
        # as a view of its bytes, whatever its item format.
        view = frame if type(frame) is bytes else memoryview(frame).cast("B")
        buffers.append(LENGTH.pack(len(view)))
        buffers.append(view)
    return buffers


def unsent(buffers: list[Any], sent: int) -> list[Any]:
    """What is left of ``buffers`` (as :func:`frame_buffers` made them) after the first
    ``sent`` bytes of them went out; a partly sent one is left as a view of its rest."""
    for index, buffer in enumerate(buffers):
        size = len(buffer)
        if sent < size:
            rest = buffers[index:]
            if sent:
                rest[0] = memoryview(buffer)[sent:]
            return rest
        sent -= size
    return []


class FrameReader:
    """Cuts a byte stream into frames of at most ``max_frame`` bytes.

    Use: ``n = sock.recv_into(reader.buffer())``, then ``reader.received(n)`` returns
    the frames completed by those ``n`` bytes (``bytes``, or a ``bytearray`` for a frame
    larger than the scratch buffer). A frame over ``max_frame`` raises ``ProtocolError``:
    the stream cannot be trusted after it.
    """

    def __init__(self, max_frame: int):
        self.max_frame = max_frame
        self._scratch = bytearray(SCRATCH_BYTES)
        self._start = 0  # first byte not yet parsed
        self._end = 0  # one past the last byte received
        self._big: bytearray | None = None
        self._big_filled = 0

    def buffer(self) -> memoryview:
        """Where the next received bytes go (never empty)."""
        if self._big is not None:
            return memoryview(self._big)[self._big_filled :]
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._scratch):  # a partial frame at the end: move it to the front
            pending = self._end - self._start
            self._scratch[:pending] = self._scratch[self._start : self._end]
            self._start, self._end = 0, pending
        return memoryview(self._scratch)[self._end :]

    def received(self, n: int) -> list[bytes | bytearray]:
        """``n`` bytes landed in the last :meth:`buffer`; return the frames they complete."""
        if self._big is not None:
            self._big_filled += n
            if self._big_filled < len(self._big):
                return []
            frame, self._big = self._big, None
            return [frame]
        self._end += n
        frames: list[bytes | bytearray] = []
        scratch = self._scratch
        while self._end - self._start >= LENGTH.size:
            (length,) = LENGTH.unpack_from(scratch, self._start)
            if length > self.max_frame:
                raise ProtocolError(f"a frame of {length} bytes exceeds the limit of {self.max_frame}")
            body = self._start + LENGTH.size
            if self._end - body >= length:
                with memoryview(scratch) as view:
                    frames.append(bytes(view[body : body + length]))
                self._start = body + length
            elif LENGTH.size + length > len(scratch):
                # Too big for the scratch buffer: it gets its own, which the rest of it
                # is received straight into.
                big = bytearray(length)
                have = self._end - body
                big[:have] = scratch[body : self._end]
                self._big, self._big_filled = big, have
                self._start = self._end = 0
                break
            else:
                break
        return frames
