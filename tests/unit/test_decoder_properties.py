"""Property tests for the decoders that are not wire messages: config files and the
text forms of keys. Whatever they are given, they answer with one typed error."""

from __future__ import annotations

import tempfile
from pathlib import Path

import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshnet.config import load_node_config, load_relay_config
from meshnet.errors import ConfigError, IdentityError
from meshnet.identity import Identity, is_peer_id, public_key_from_peer_id

KEY = Identity.generate().private_key_text
SECTIONS = {
    "identity": ["private_key", "peer_id"],
    "api": ["endpoint", "allowed_clients", "max_unread_bytes"],
    "relay": [
        "endpoint",
        "peer_id",
        "heartbeat_interval",
        "liveness",
        "reconnect_min",
        "reconnect_max",
        "listen",
        "bind",
        "access",
        "allowed_peers",
        "max_message_bytes",
        "high_water_mark",
        "max_unread_bytes",
        "max_queued_bytes",
    ],
    "jobs": [
        "enabled",
        "queue_size",
        "executors",
        "default_timeout",
        "max_timeout",
        "max_payload_bytes",
        "max_queued_bytes",
        "drain_grace",
        "capabilities",
    ],
    "log": ["format", "level"],
}
toml_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.datetimes(),
    st.dates(),
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)


@st.composite
def config_documents(draw: st.DrawFn) -> dict:
    document: dict = {"identity": {"private_key": KEY}}
    for section in draw(st.lists(st.sampled_from([*SECTIONS, "bogus"]), max_size=4)):
        keys = SECTIONS.get(section, ["x"])
        table = document.setdefault(section, {})
        for key in draw(st.lists(st.sampled_from([*keys, "typo"]), max_size=3)):
            table[key] = draw(toml_values)
    return document


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config_documents())
def test_any_config_document_loads_or_raises_one_config_error(document: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.toml"
        path.write_text(tomli_w.dumps(document))
        for load in (load_node_config, load_relay_config):
            try:
                load(path)
            except ConfigError as exc:
                assert str(path) in str(exc)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_config_bytes_load_or_raise_one_config_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.toml"
        path.write_bytes(data)
        try:
            load_node_config(path)
        except ConfigError:
            pass


@settings(max_examples=500, deadline=None)
@given(
    st.text(max_size=80)
    | st.text(alphabet="123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz", max_size=60).map(lambda t: "z" + t)
)
def test_any_key_text_decodes_or_raises_identity_error(text: str) -> None:
    for decode in (Identity.from_private_key, public_key_from_peer_id):
        try:
            decode(text)
        except IdentityError:
            pass
    assert is_peer_id(text) in (True, False)
