"""The relay's registry: devices ranked for a job's requirements, why none fits, and a
listing that pages in a stable order (relay_server.registry)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from relay_server.registry import Registry

CPU = {"cores": 8, "gpus": 0, "tier": "desktop", "executors": 2, "kinds": ["echo"]}
GPU = {"cores": 16, "gpus": 1, "tier": "server", "executors": 4, "kinds": ["echo", "embed"]}


def test_candidates_meet_the_requirements_and_come_most_free_first() -> None:
    registry = Registry()
    for name, caps in (("p-a", CPU), ("p-b", CPU), ("p-c", GPU), ("p-d", CPU)):
        registry.join(name, caps)
    registry.heard("p-a", {"busy": 2, "free": 0, "queued": 3}, 0.001)
    registry.heard("p-b", {"busy": 1, "free": 1, "queued": 0}, 0.004)
    registry.heard("p-c", {"busy": 0, "free": 4, "queued": 0}, 0.002)
    registry.heard("p-d", {"busy": 1, "free": 1, "queued": 0}, 0.003)  # as free as p-b, nearer
    assert [d.peer_id for d in registry.candidates({})] == ["p-c", "p-d", "p-b", "p-a"]
    assert [d.peer_id for d in registry.candidates({"gpus": 1})] == ["p-c"]
    assert [d.peer_id for d in registry.candidates({"kinds": ["echo"]}, exclude=frozenset({"p-c"}))] == [
        "p-d",
        "p-b",
        "p-a",
    ]
    registry.heard("p-a", None, None)  # a heartbeat that tells nothing changes nothing
    assert registry.devices["p-a"].load == {"busy": 2, "free": 0, "queued": 3}


def test_a_device_that_has_not_told_its_load_counts_its_executors_as_free() -> None:
    registry = Registry()
    registry.join("p-new", GPU)  # 4 executors, no heartbeat yet
    registry.join("p-old", CPU)
    registry.heard("p-old", {"busy": 0, "free": 2, "queued": 0}, 0.001)
    assert [d.peer_id for d in registry.candidates({})] == ["p-new", "p-old"]


def test_why_no_device_fits_names_the_requirement_nothing_meets() -> None:
    registry = Registry()
    assert registry.unmet_by_all({"gpus": 1}) == "no device is online"
    registry.join("p-a", CPU)
    registry.join("p-c", GPU)
    assert registry.unmet_by_all({"gpus": 1}) is None
    assert registry.unmet_by_all({"gpus": 2, "cores": 4}) == "no device has gpus >= 2"
    assert registry.unmet_by_all({"tier": "desktop", "gpus": 1}) == (
        "no device meets all of tier = desktop, gpus >= 1 at once"
    )


def test_a_peer_sending_ill_typed_capabilities_meets_no_requirement_on_them() -> None:
    registry = Registry()
    registry.join("p-x", {"gpus": "eight", "tier": "server", "weird": [1]})
    assert registry.candidates({"gpus": 1}) == []
    assert [d.peer_id for d in registry.candidates({"tier": "server"})] == ["p-x"]


def test_leaving_and_joining_again_keeps_the_order_and_the_last_load() -> None:
    registry = Registry()
    for name in ("p-c", "p-a", "p-b"):
        registry.join(name, CPU)
    registry.heard("p-b", {"busy": 1, "free": 1, "queued": 0}, 0.01)
    registry.join("p-b", GPU)  # registered again (it reconnected): new capabilities, same load
    assert registry.devices["p-b"].caps["gpus"] == 1 and registry.devices["p-b"].load is not None
    assert list(registry.page()) == ["p-a", "p-b", "p-c"]
    registry.leave("p-b")
    registry.leave("p-b")  # twice: nothing
    assert list(registry.page()) == ["p-a", "p-c"] and len(registry) == 2
    assert list(registry.page("p-a")) == ["p-c"] and registry.count_after("p-a") == 1
    assert list(registry.page("p-b")) == ["p-c"]  # a cursor that left still pages on


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from([f"p-{n:02d}" for n in range(30)]), min_size=1, max_size=30, unique=True),
    st.lists(st.tuples(st.booleans(), st.sampled_from([f"p-{n:02d}" for n in range(40)])), max_size=20),
    st.integers(min_value=1, max_value=7),
)
def test_paging_lists_every_device_present_throughout_exactly_once(
    first: list[str], changes: list[tuple[bool, str]], page_size: int
) -> None:
    registry = Registry()
    for name in first:
        registry.join(name, CPU)
    present = set(first)
    steady = set(first)  # there from the first page to the last
    seen: list[str] = []
    after: str | None = None
    while True:
        page = []
        for peer in registry.page(after):
            page.append(peer)
            if len(page) == page_size:
                break
        seen += page
        if not page or registry.count_after(page[-1]) == 0:
            break
        after = page[-1]
        if changes:  # devices join and leave between pages
            joins, name = changes.pop()
            if joins:
                registry.join(name, CPU)
                present.add(name)
            else:
                registry.leave(name)
                present.discard(name)
                steady.discard(name)
    assert len(seen) == len(set(seen)), "no device twice"
    assert seen == sorted(seen), "in peer-id order"
    assert steady <= set(seen), "every device there throughout is listed"
