"""The relay's STUN responder, over real UDP on loopback: pystun3 (the classifier nodes
use) and an RFC 5389 request get their answers from the real relay process."""

from __future__ import annotations

import json
import os
import socket
import struct

import stun

from meshnet import MeshClient
from tests.harness import Mesh, cli

MAGIC_COOKIE = 0x2112A442


def free_udp_port(ip: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((ip, 0))
        return sock.getsockname()[1]


def start_relay(mesh: Mesh, addresses: list[str]) -> tuple[int, int]:
    port, alt_port = free_udp_port("127.0.0.1"), free_udp_port("127.0.0.1")
    path, _, _ = mesh.relay_config(access="open", stun={"addresses": addresses, "port": port, "alt_port": alt_port})
    relay = mesh.start_relay(path)
    expected = [f"{ip}:{p}" for ip in addresses for p in (port, alt_port)]
    assert relay.find("relay_started")[0]["stun"] == expected
    return port, alt_port


def classify(source_ip: str, stun_port: int) -> tuple[str, dict]:
    """pystun3's RFC 3489 tests from a socket on ``source_ip``, as a node runs them."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        sock.bind((source_ip, 0))
        return stun.get_nat_type(sock, source_ip, sock.getsockname()[1], stun_host="127.0.0.1", stun_port=stun_port)


def start_member(mesh: Mesh) -> str:
    """A node registered at the last relay started, from 127.0.0.1; its API endpoint."""
    relay = mesh.processes[-1]
    started = relay.find("relay_started")[0]
    path, _, api = mesh.node_config("a", relay=(started["endpoint"], started["relay_id"]))
    mesh.start_node("a", path, registered=True)
    return api


def test_pystun3_classifies_loopback_through_the_relay_with_change_request(mesh: Mesh) -> None:
    port, _ = start_relay(mesh, ["127.0.0.1", "127.0.0.2"])
    start_member(mesh)
    nat_type, answer = classify("127.0.0.1", port)
    # The mapped address is the socket's own: no NAT; the CHANGE-REQUEST test was answered
    # from the other address and port.
    assert nat_type == stun.OpenInternet, answer
    assert answer["ExternalIP"] == "127.0.0.1"
    # From an IP with no registered relay connection, CHANGE-REQUEST goes unanswered (a
    # stranger cannot have answers sent from the other address): pystun3 reads a firewall.
    nat_type, answer = classify("127.0.0.5", port)
    assert nat_type == stun.SymmetricUDPFirewall, answer


def test_an_rfc5389_request_gets_its_xor_mapped_address(mesh: Mesh) -> None:
    port, _ = start_relay(mesh, ["127.0.0.1"])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.bind(("127.0.0.1", 0))
        txid = MAGIC_COOKIE.to_bytes(4, "big") + os.urandom(12)
        sock.sendto(b"\x00\x01\x00\x00" + txid, ("127.0.0.1", port))
        # A datagram that is no request first: dropped, and nothing else disturbed.
        sock.sendto(b"\x01\x01\x00\x00" + txid, ("127.0.0.1", port))
        data, source = sock.recvfrom(2048)
        assert source == ("127.0.0.1", port)
        assert data[:2] == b"\x01\x01" and data[4:20] == txid
        at, found = 20, {}
        while at < len(data):
            code, size = struct.unpack_from("!HH", data, at)
            found[code] = data[at + 4 : at + 4 + size]
            at += 4 + size
        value = found[0x0020]
        mapped_port = int.from_bytes(value[2:4], "big") ^ (MAGIC_COOKIE >> 16)
        mapped_ip = bytes(a ^ b for a, b in zip(value[4:8], txid[:4], strict=True))
        assert (socket.inet_ntoa(mapped_ip), mapped_port) == sock.getsockname()
        assert 0x0005 not in found  # one address: no CHANGED-ADDRESS to offer


def test_a_stun_port_in_use_stops_the_relay_with_one_line_naming_it(mesh: Mesh) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        taken = holder.getsockname()[1]
        path, _, _ = mesh.relay_config(access="open", stun={"addresses": ["127.0.0.1"], "port": taken})
        done = cli("relay", "--config", str(path))
    assert done.returncode != 0
    assert done.stderr.splitlines() == [
        f"error: stun.port = udp://127.0.0.1:{taken} cannot be bound (Address already in use): "
        f"another process listens there; stop it or set stun.port in {path}"
    ]


def test_netcheck_reports_the_nat_type_and_both_public_addresses(mesh: Mesh) -> None:
    port, _ = start_relay(mesh, ["127.0.0.1", "127.0.0.2"])
    api = start_member(mesh)
    done = cli("netcheck", "--node", api, "--stun", f"127.0.0.1:{port}", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["nat_type"], report["classified"], report["mapping_varies_by_destination"]) == ("open", True, False)
    assert report["public_address"] == report["local_address"]
    with MeshClient(api) as client:
        local_port = client.status()["relay"]["local_port"]
    assert report["relay_observed_tcp"] == f"127.0.0.1:{local_port}"
    text = cli("netcheck", "--node", api, "--stun", f"127.0.0.1:{port}")
    assert text.returncode == 0 and "nat type:        open (pystun3: Open Internet)" in text.stdout, text.stdout


def test_netcheck_against_a_one_address_server_says_what_it_cannot_tell(mesh: Mesh) -> None:
    port, _ = start_relay(mesh, ["127.0.0.1"])
    done = cli("netcheck", "--stun", f"127.0.0.1:{port}", "--json")  # no node asked
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["nat_type"], report["classified"], report["mapping_varies_by_destination"]) == ("open", False, None)
