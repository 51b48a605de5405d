"""Capabilities: detection, the config's schema, reading a peer's; requirements matched
against them (meshnet.capabilities, meshnet.requirements)."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshnet.capabilities import (
    TIERS,
    check_capabilities,
    detect_tier,
    node_capabilities,
    nvidia_gpus,
    parse_nvidia_smi,
    read_capabilities,
)
from meshnet.requirements import check_requirements, describe, unmet

A100_AND_T4 = "NVIDIA A100-SXM4-80GB, 81920\nTesla T4, 15360\n"


def no_gpus() -> tuple[int, list[str], int]:
    return 0, [], 0


def test_a_node_detects_its_machine_and_adds_its_executors_and_kinds() -> None:
    caps = node_capabilities(2, ["echo", "sleep"], {}, detect_gpus=no_gpus)
    assert caps["cores"] >= 1 and caps["memory_bytes"] > 0
    assert caps["arch"] and caps["os"] == "linux"
    assert caps["gpus"] == 0 and "gpu_models" not in caps
    assert caps["tier"] in TIERS
    assert caps["executors"] == 2 and caps["kinds"] == ["echo", "sleep"]
    assert check_capabilities({k: v for k, v in caps.items() if k not in ("executors", "kinds")})  # its own schema


def test_the_config_wins_over_what_is_detected_and_adds_labels() -> None:
    configured = check_capabilities(
        {"gpus": 1, "gpu_models": ["RTX 4090"], "tier": "server", "labels": {"site": "lab"}}
    )
    caps = node_capabilities(4, ["echo"], configured, detect_gpus=no_gpus)
    assert caps["gpus"] == 1 and caps["gpu_models"] == ["RTX 4090"]
    assert caps["tier"] == "server" and caps["labels"] == {"site": "lab"}


def test_gpus_detected_by_nvidia_smi_are_counted_with_models_and_the_largest_memory() -> None:
    assert parse_nvidia_smi(A100_AND_T4) == (2, ["NVIDIA A100-SXM4-80GB", "Tesla T4"], 81920 * 2**20)
    assert parse_nvidia_smi("") == (0, [], 0)
    caps = node_capabilities(1, [], {}, detect_gpus=lambda: parse_nvidia_smi(A100_AND_T4))
    assert caps["gpus"] == 2 and caps["gpu_memory_bytes"] == 81920 * 2**20


def test_a_machine_without_nvidia_smi_has_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert nvidia_gpus() == (0, [], 0)


def test_a_failing_nvidia_smi_leaves_the_node_without_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "nvidia-smi"
    broken.write_text(
        "#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the driver' >&2\nexit 9\n"
    )
    broken.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert nvidia_gpus() == (0, [], 0)
    working = tmp_path / "nvidia-smi"
    working.write_text(f"#!/bin/sh\nprintf '{A100_AND_T4}'\n")
    assert nvidia_gpus()[0] == 2


def test_the_tier_is_guessed_from_the_machine(tmp_path: Path) -> None:
    assert detect_tier(32, 128 * 2**30, "x86_64", power_supplies=tmp_path) == "server"
    assert detect_tier(8, 16 * 2**30, "x86_64", power_supplies=tmp_path) == "desktop"
    assert detect_tier(4, 4 * 2**30, "aarch64", power_supplies=tmp_path) == "edge"
    (tmp_path / "BAT0").mkdir()
    assert detect_tier(8, 16 * 2**30, "x86_64", power_supplies=tmp_path) == "laptop"
    assert detect_tier(8, 16 * 2**30, "x86_64", power_supplies=tmp_path / "absent") == "desktop"


@pytest.mark.parametrize(
    ("configured", "error"),
    [
        ({"memory_gb": 16}, "not 'memory_gb': a capability of your own goes under labels"),
        ({"gpus": -1}, "gpus: an integer of at least 0"),
        ({"gpus": True}, "gpus: an integer"),
        ({"cores": 0}, "cores: an integer of at least 1"),
        ({"tier": "mainframe"}, "tier: one of server, desktop, laptop, edge"),
        ({"arch": ""}, "arch: a text of 1 to"),
        ({"gpu_models": "A100"}, "gpu_models: a list"),
        ({"labels": {"site": ["a"]}}, "labels.site: a text, number or boolean"),
        ({"labels": {f"l{i}": 1 for i in range(33)}}, "labels: a table of at most 32"),
    ],
)
def test_the_config_schema_names_what_is_wrong(configured: dict, error: str) -> None:
    with pytest.raises(ValueError) as caught:
        check_capabilities(configured)
    assert error in str(caught.value)


def test_a_peers_capabilities_are_read_by_the_schema_keeping_unknown_keys() -> None:
    sent = {"cores": 8, "gpus": "two", "tier": "mainframe", "kinds": ["echo", 3], "labels": {"a": 1}, "x": [1]}
    assert read_capabilities(sent) == {"cores": 8, "labels": {"a": 1}, "x": [1]}


DEVICE = {
    "cores": 8,
    "memory_bytes": 16 * 2**30,
    "arch": "x86_64",
    "os": "linux",
    "gpus": 1,
    "gpu_memory_bytes": 24 * 2**30,
    "tier": "desktop",
    "executors": 2,
    "kinds": ["echo", "embed"],
    "labels": {"site": "lab", "spot": False},
}


@pytest.mark.parametrize(
    ("requires", "unmet_text"),
    [
        ({}, None),
        ({"gpus": 1, "cores": 8, "tier": ["desktop", "server"], "kinds": ["embed"]}, None),
        ({"labels": {"site": "lab", "spot": False}}, None),
        ({"gpus": 2}, "gpus >= 2"),
        ({"cores": 4, "memory_bytes": 32 * 2**30}, "memory_bytes >= 34359738368"),
        ({"arch": "aarch64"}, "arch = aarch64"),
        ({"tier": ["server", "edge"]}, "tier = server or edge"),
        ({"kinds": ["ocr", "echo", "x"]}, "kinds include ocr, x"),
        ({"labels": {"site": "home"}}, "labels.site = 'home'"),
        ({"labels": {"spot": 0}}, "labels.spot = 0"),  # False is not 0 here
        ({"labels": {"rack": "a"}}, "labels.rack = 'a'"),
    ],
)
def test_requirements_are_met_or_the_first_unmet_one_is_named(requires: dict, unmet_text: str | None) -> None:
    assert unmet(DEVICE, check_requirements(requires)) == unmet_text


def test_a_device_that_does_not_say_has_none_of_it() -> None:
    assert unmet({}, {"gpus": 0}) == "gpus >= 0"  # not told: not met, even for 0
    assert unmet(read_capabilities({"gpus": "lots"}), {"gpus": 1}) == "gpus >= 1"


@pytest.mark.parametrize(
    ("requires", "error"),
    [
        ({"gpu": 1}, "a known requirement"),
        ({"gpus": 1.5}, "gpus: a minimum"),
        ({"tier": "mainframe"}, "tier: one of"),
        ({"arch": []}, "arch: a text, or a list"),
        ({"kinds": "echo"}, "kinds: a list"),
        ({"labels": {"a": [1]}}, "labels: names to texts"),
        ([1], "a map of requirements"),
    ],
)
def test_malformed_requirements_are_refused_naming_the_key(requires: object, error: str) -> None:
    with pytest.raises(ValueError) as caught:
        check_requirements(requires)
    assert error in str(caught.value)


def test_requirements_are_described_in_words() -> None:
    assert describe({"gpus": 1, "tier": ["server", "desktop"], "labels": {"site": "lab"}}) == (
        "gpus >= 1, tier = server or desktop, labels.site = 'lab'"
    )
    assert describe({}) == "nothing"
