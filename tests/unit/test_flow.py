"""Flow control on a relay link: windows, acknowledgements, the send queue (meshnet.flow)."""

from __future__ import annotations

from meshnet.flow import LinkFlow, Queued, SendQueue, frames_size


def test_a_sender_keeps_at_most_a_window_in_flight():
    flow = LinkFlow(window=1000)
    assert flow.may_send(600)
    flow.on_sent(600)
    assert flow.may_send(400) and not flow.may_send(401)
    flow.on_sent(400)
    flow.on_ack(500)
    assert flow.in_flight == 500 and flow.may_send(500) and not flow.may_send(501)


def test_one_message_larger_than_the_window_may_go_alone():
    flow = LinkFlow(window=100)
    assert flow.may_send(10_000)
    flow.on_sent(10_000)
    assert not flow.may_send(1)
    flow.on_ack(10_000)
    assert flow.may_send(1)


def test_acks_never_go_backwards_nor_past_what_was_sent():
    flow = LinkFlow(window=1000)
    flow.on_sent(800)
    flow.on_ack(500)
    flow.on_ack(100)  # a stale ack
    assert flow.in_flight == 300
    flow.on_ack(10**15)  # a confused or hostile peer
    assert flow.in_flight == 0


def test_a_receiver_acknowledges_every_quarter_window():
    flow = LinkFlow(window=1000)
    acks = [flow.on_received(100) for _ in range(10)]
    assert acks == [None, None, 300, None, None, 600, None, None, 900, None]


def test_unsent_bytes_are_taken_back():
    flow = LinkFlow(window=1000)
    flow.on_sent(700)
    flow.on_unsent(700)
    assert flow.in_flight == 0


def test_reset_starts_counting_again_with_the_new_window():
    flow = LinkFlow(window=1000)
    flow.on_sent(900)
    flow.on_received(900)
    flow.reset(5000)
    assert (flow.window, flow.in_flight, flow.received, flow.acked) == (5000, 0, 0, 0)


def item(size: int, ref: bytes = b"r" * 16, op: str = "job") -> Queued:
    return Queued([b"x" * size], size, ref, op)


def test_the_queue_sends_in_order_as_far_as_the_window_allows():
    flow = LinkFlow(window=1000)
    queue = SendQueue(budget=10_000)
    for i in range(5):
        queue.push(item(400, ref=bytes([i]) * 16))
    sent = queue.pop_sendable(flow)
    assert [entry.ref[0] for entry in sent] == [0, 1]
    assert flow.in_flight == 800 and queue.size == 1200
    flow.on_ack(800)
    assert [entry.ref[0] for entry in queue.pop_sendable(flow)] == [2, 3]


def test_the_queue_is_bounded_in_bytes():
    queue = SendQueue(budget=1000)
    assert queue.fits(1000) and not queue.fits(1001)
    queue.push(item(600))
    assert queue.fits(400) and not queue.fits(401)


def test_frames_size_counts_every_frame():
    assert frames_size([b"abc", bytearray(5), memoryview(b"12")]) == 10


def test_a_message_larger_than_the_room_goes_when_at_most_a_quarter_window_is_in_flight():
    flow = LinkFlow(window=1000)
    flow.on_sent(250)  # what a receiver may leave unacknowledged on a quiet link
    assert flow.may_send(990)
    flow.on_sent(1)
    assert not flow.may_send(990) and flow.may_send(749)


def test_a_heartbeat_acknowledges_whatever_was_read():
    flow = LinkFlow(window=1000)
    assert flow.ack_all() is None
    assert flow.on_received(100) is None
    assert flow.ack_all() == 100
    assert flow.ack_all() is None
    assert flow.on_received(249) is None and flow.on_received(1) == 350
