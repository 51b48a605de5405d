"""Real NATs on this machine: Linux network namespaces joined by veth pairs, with iptables
routers between them (the facts behind it: ../shared/NAT-LAB.md, checked here).

One :class:`Lab` is one topology::

    [host ns] --veth-- [router ns: lan bridge | iptables | wan] --veth-- [inet ns: bridge]
                                                                  [relay ns] --veth--/
                                                                  [public host ns] --/

The "internet" is 198.51.100.0/24 (a documentation range), each NAT's LAN a 10.0.N.0/24;
nothing is routed off the machine, and nothing outside the lab's namespaces can reach
them. Every namespace is named ``mnl<pid>-<name>``: :meth:`Lab.close` kills what runs in
them and deletes them (with their veths and iptables rules), and :func:`sweep` deletes
those of a test process that died before it could.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field

PREFIX = "mnl"
INTERNET = "198.51.100"
#: NAT kinds the lab builds, and the iptables rules of each (NAT-LAB.md). The INPUT rule
#: matters: without it a router's own stack answers an early SYN with a RST.
RESTRICTING_FILTER = [
    "-A FORWARD -i wan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
    "-A FORWARD -i wan -j DROP",
    "-A INPUT -i wan -m conntrack --ctstate NEW -j DROP",
]
#: ``udp_full_cone``: full cone for UDP (STUN calls it full cone) and port-restricted for
#: TCP, as a real endpoint-independent NAT is for a TCP port its host never sent from.
NAT_KINDS = ("full_cone", "port_restricted", "symmetric", "udp_full_cone")


class LabError(RuntimeError):
    """A lab command failed: its command line and what it printed."""


def missing_tools() -> list[str]:
    """The programs the lab needs that this machine lacks (``make test`` installs them)."""
    return [tool for tool in ("ip", "iptables", "turnserver") if shutil.which(tool) is None]


def why_not_available() -> str | None:
    """Why lab tests cannot run here (None: they can)."""
    if os.geteuid() != 0:
        return "the NAT lab needs root (network namespaces and iptables); CI runs as root"
    missing = missing_tools()
    if missing:
        return f"the NAT lab needs {', '.join(missing)}; `make test` installs them as root (apt-get)"
    return None


def sh(*argv: str, check: bool = True, timeout: float = 30) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def namespaces() -> list[str]:
    return [line.split()[0] for line in sh("ip", "netns", "list").splitlines() if line.strip()]


def delete_namespace(name: str) -> None:
    """Kill every process in namespace ``name``, then delete it (its veths and iptables
    rules go with it)."""
    for _ in range(50):
        # Entering first, then inside: a process that goes from one to the other between
        # the two looks (``ip netns exec`` joins, then execs) is caught by the second.
        pids = _entering(name)
        pids += [int(p) for p in sh("ip", "netns", "pids", name, check=False).split()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)  # the kernel reaps them; polled, bounded
    sh("ip", "netns", "del", name, check=False)


def _entering(name: str) -> list[int]:
    """Processes still ``ip netns exec name ...``: started but not yet inside, so ``ip netns
    pids`` misses them, and once the name is gone they would run on in an unnamed namespace."""
    wanted = ["ip", "netns", "exec", name]
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")[:4]
        except OSError:
            continue
        if argv and [os.path.basename(argv[0]), *argv[1:]] == wanted:
            found.append(int(entry))
    return found


def sweep() -> list[str]:
    """Delete the lab namespaces of test processes that are gone (a test killed before it
    could clean up). Returns their names."""
    stale = []
    for name in namespaces():
        owner = name[len(PREFIX) :].split("-", 1)[0]
        if name.startswith(PREFIX) and owner.isdigit() and not _alive(int(owner)):
            delete_namespace(name)
            stale.append(name)
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Host:
    """A machine of the lab: a namespace, its address on its network, and its router."""

    name: str
    ns: str
    ip: str
    #: The NAT in front of it (None: on the internet itself).
    router: Router | None = None

    @property
    def public_ip(self) -> str:
        return self.router.wan_ip if self.router is not None else self.ip


@dataclass
class Router:
    name: str
    ns: str
    kind: str
    wan_ip: str
    lan_prefix: str
    hosts: list[Host] = field(default_factory=list)


class Lab:
    def __init__(self, tag: str = "") -> None:
        self.prefix = f"{PREFIX}{os.getpid()}-{tag}"
        self.created: list[str] = []
        self.routers: dict[str, Router] = {}
        self._next_public = 10
        self._next_lan = 1
        self.inet = self._namespace("inet")
        self.exec(self.inet, "ip", "link", "add", "br0", "type", "bridge")
        self.exec(self.inet, "ip", "link", "set", "br0", "up")

    # -- building --

    def _namespace(self, name: str) -> str:
        ns = f"{self.prefix}{name}"
        if len(ns) > 40:
            raise LabError(f"namespace name {ns} is too long")
        sh("ip", "netns", "add", ns)
        self.created.append(ns)
        self.exec(ns, "ip", "link", "set", "lo", "up")
        return ns

    def wire(self, ns: str, ifname: str, bridge_ns: str, bridge: str) -> None:
        """A veth from ``ns`` (named ``ifname`` there) to ``bridge`` in ``bridge_ns``."""
        peer = f"v{len(self.created)}{ifname}"[:15]
        sh("ip", "link", "add", "name", ifname, "netns", ns, "type", "veth", "peer", "name", peer, "netns", bridge_ns)
        self.exec(bridge_ns, "ip", "link", "set", peer, "master", bridge)
        self.exec(bridge_ns, "ip", "link", "set", peer, "up")
        self.exec(ns, "ip", "link", "set", ifname, "up")

    def public_ip(self) -> str:
        self._next_public += 1
        return f"{INTERNET}.{self._next_public}"

    def public_host(self, name: str, *extra_ips: str) -> Host:
        """A host with an address of its own on the internet (and ``extra_ips`` too)."""
        ns = self._namespace(name)
        self.wire(ns, "eth0", self.inet, "br0")
        ip = self.public_ip()
        for address in (ip, *extra_ips):
            self.exec(ns, "ip", "addr", "add", f"{address}/24", "dev", "eth0")
        return Host(name, ns, ip)

    def router(self, name: str, kind: str) -> Router:
        """A NAT router of ``kind`` (one of NAT_KINDS) with a LAN behind it."""
        if kind not in NAT_KINDS:
            raise LabError(f"unknown NAT kind {kind!r}; one of {', '.join(NAT_KINDS)}")
        ns = self._namespace(name)
        self.wire(ns, "wan", self.inet, "br0")
        wan_ip = self.public_ip()
        self.exec(ns, "ip", "addr", "add", f"{wan_ip}/24", "dev", "wan")
        lan = f"10.0.{self._next_lan}"
        self._next_lan += 1
        self.exec(ns, "ip", "link", "add", "lan", "type", "bridge")
        self.exec(ns, "ip", "addr", "add", f"{lan}.1/24", "dev", "lan")
        self.exec(ns, "ip", "link", "set", "lan", "up")
        self.exec(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        masquerade = "-t nat -A POSTROUTING -o wan -j MASQUERADE"
        rules = [masquerade + (" --random-fully" if kind == "symmetric" else "")]
        if kind == "udp_full_cone":
            rules.append("-A FORWARD -i wan -p udp -j ACCEPT")  # DNATed to its host (below)
        if kind != "full_cone":
            rules += RESTRICTING_FILTER
        for rule in rules:
            self.exec(ns, "iptables", *rule.split())
        router = self.routers[name] = Router(name, ns, kind, wan_ip, lan)
        return router

    def host_behind(self, router: Router, name: str) -> Host:
        ns = self._namespace(name)
        self.wire(ns, "eth0", router.ns, "lan")
        ip = f"{router.lan_prefix}.{len(router.hosts) + 10}"
        self.exec(ns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        self.exec(ns, "ip", "route", "add", "default", "via", f"{router.lan_prefix}.1")
        host = Host(name, ns, ip, router)
        if router.kind in ("full_cone", "udp_full_cone"):
            if router.hosts:
                raise LabError("a full-cone (1:1) router has one host behind it")
            # Everything (UDP only, for udp_full_cone) arriving at the router goes on to its
            # one host: a DMZ, which STUN classifiers call full cone.
            udp = ["-p", "udp"] if router.kind == "udp_full_cone" else []
            self.exec(router.ns, "iptables", "-t", "nat", "-A", "PREROUTING", "-i", "wan", *udp, "-j", "DNAT",
                      "--to-destination", ip)  # fmt: skip
        router.hosts.append(host)
        return host

    # -- running --

    def exec(self, ns: str, *argv: str, check: bool = True) -> str:
        return sh("ip", "netns", "exec", ns, *argv, check=check)

    @staticmethod
    def command(ns: str, argv: list[str]) -> list[str]:
        """``argv`` run inside namespace ``ns``."""
        return ["ip", "netns", "exec", ns, *argv]

    def iptables_rules(self) -> dict[str, str]:
        return {ns: self.exec(ns, "iptables-save") for ns in self.created}

    def close(self) -> None:
        for ns in reversed(self.created):
            delete_namespace(ns)
        self.created.clear()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
