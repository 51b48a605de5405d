"""The relay's STUN responder cannot be used as a weapon, nor to stop relaying: a flood
of requests from many sources (tests.floods) draws at most the responder's rate of
answers, and one log line, while relayed jobs go on (``python -m bench.stun_flood``
measures how fast)."""

from __future__ import annotations

from meshnet.stun import PER_SOURCE_BURST, PER_SOURCE_RATE, TOTAL_BURST, TOTAL_RATE
from tests.floods import REQUESTS, flood_a_relay
from tests.harness import Mesh


def test_a_flood_of_spoofed_stun_requests_draws_at_most_the_bucket_and_relaying_goes_on(mesh: Mesh) -> None:
    run = flood_a_relay(mesh)
    flood = run.flood
    answered = sum(flood.answers.values())
    assert flood.sent == REQUESTS
    assert 0 < answered <= TOTAL_BURST + TOTAL_RATE * (flood.took + 1.0), (answered, flood.took)
    assert max(flood.answers.values()) <= PER_SOURCE_BURST + PER_SOURCE_RATE * (flood.took + 1.0)
    assert len(run.during) >= 10 and max(run.during) < 5.0, "relayed jobs stalled during the flood"
    # The log: a line per summary interval, not one per request refused.
    refused = run.relay.wait_for("stun_requests_refused", timeout=15)
    assert refused["rate_limited"] > REQUESTS // 2
    assert len(run.relay.find("stun_requests_refused")) <= 2
