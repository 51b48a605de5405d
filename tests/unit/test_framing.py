"""Frames between a node and its workers: whatever way a stream is cut into receives,
the reader yields exactly the frames that were sent, and the writer's helper keeps
exactly the bytes not yet sent."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnet.errors import ProtocolError
from meshnet.jobs.framing import SCRATCH_BYTES, FrameReader, frame_buffers, unsent


def stream_of(frames: list[bytes]) -> bytes:
    return b"".join(bytes(b) for b in frame_buffers(frames))


def read_in_chunks(data: bytes, cuts: list[int], max_frame: int = 1 << 24) -> list[bytes]:
    """Feed ``data`` to a reader, each receive at most the next cut's size (like a socket)."""
    reader = FrameReader(max_frame)
    out: list[bytes] = []
    pos, i = 0, 0
    while pos < len(data):
        target = reader.buffer()
        want = cuts[i % len(cuts)] if cuts else len(data)
        i += 1
        n = min(len(target), max(1, want), len(data) - pos)
        target[:n] = data[pos : pos + n]
        pos += n
        out += [bytes(f) for f in reader.received(n)]
    return out


frames_strategy = st.lists(
    st.one_of(st.binary(max_size=64), st.integers(0, 3 * SCRATCH_BYTES).map(lambda n: bytes([n % 251]) * n)),
    max_size=6,
)


@settings(max_examples=150, deadline=None)
@given(frames=frames_strategy, cuts=st.lists(st.integers(1, 2 * SCRATCH_BYTES), max_size=8))
def test_any_cut_of_the_stream_gives_back_the_frames(frames: list[bytes], cuts: list[int]) -> None:
    assert read_in_chunks(stream_of(frames), cuts) == frames


def test_many_small_frames_in_one_receive_and_one_byte_at_a_time() -> None:
    frames = [bytes([i % 256]) * i for i in range(300)]
    data = stream_of(frames)
    assert read_in_chunks(data, [len(data)]) == frames
    whole = [f for n, f in enumerate(frames) if len(stream_of(frames[: n + 1])) <= 2000]
    assert read_in_chunks(data[:2000], [1]) == whole  # a partial frame is held back


def test_a_large_frame_is_received_into_a_buffer_of_its_own() -> None:
    big = bytes(range(256)) * (4 * SCRATCH_BYTES // 256)
    reader = FrameReader(1 << 24)
    data = stream_of([b"kind", big])
    pos = 0
    frames: list[bytes | bytearray] = []
    while pos < len(data):
        target = reader.buffer()
        n = min(len(target), len(data) - pos)
        target[:n] = data[pos : pos + n]
        pos += n
        frames += reader.received(n)
    assert frames == [b"kind", big]
    assert isinstance(frames[1], bytearray)  # not joined from chunks


def test_a_frame_over_the_limit_is_refused() -> None:
    reader = FrameReader(max_frame=100)
    data = stream_of([b"x" * 101])
    target = reader.buffer()
    target[: len(data)] = data
    with pytest.raises(ProtocolError, match="101 bytes exceeds the limit of 100"):
        reader.received(len(data))


@given(sizes=st.lists(st.integers(0, 50), min_size=1, max_size=5), sent=st.integers(0, 300))
def test_unsent_keeps_exactly_the_bytes_not_yet_sent(sizes: list[int], sent: int) -> None:
    frames = [bytes([65 + i]) * n for i, n in enumerate(sizes)]
    buffers = frame_buffers(frames)
    whole = b"".join(bytes(b) for b in buffers)
    sent = min(sent, len(whole))
    assert b"".join(bytes(b) for b in unsent(buffers, sent)) == whole[sent:]
