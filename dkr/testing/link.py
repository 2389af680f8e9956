"""A slower network than loopback: a network namespace behind a shaped veth pair.

Loopback moves a gigabyte a second and hides what a real link shows (which
blob gets the bandwidth first, how extraction overlaps the download). This
makes a link that tests and benchmarks can put a server behind::

    with ShapedLink() as link:
        registry = Registry(link=link)          # docker-registry inside the namespace
        ...push...
        link.shape("100mbit")                   # tbf on both ends of the pair
        pull(f"{registry.host}/...")

The namespace and its addresses (a /30 of 10.231.0.0/16 that no interface
of this machine uses) exist only while the context is open; nothing leaves
the machine. This kernel has no netem: the link is a rate and a queue, no
added delay. Needs root and iproute2.
"""

from __future__ import annotations

import ipaddress
import secrets
import shutil
import subprocess

SUBNETS = ipaddress.ip_network("10.231.0.0/16")


class LinkError(RuntimeError):
    pass


def _ip(*args: str, netns: str | None = None) -> str:
    cmd = (["ip", "netns", "exec", netns] if netns else []) + list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LinkError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    return proc.stdout


def unavailable_reason() -> str | None:
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    probe = f"dkr-probe-{secrets.token_hex(3)}"
    try:
        _ip("ip", "netns", "add", probe)
    except LinkError as e:
        return f"cannot make a network namespace: {e}"
    _ip("ip", "netns", "del", probe)
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    """A random /30 of SUBNETS that overlaps no address of this namespace."""
    used = [ipaddress.ip_interface(word).network
            for line in _ip("ip", "-4", "-o", "addr", "show").splitlines()
            for word in line.split()[3:4]]
    for _ in range(100):
        subnet = ipaddress.ip_network((int(SUBNETS.network_address) + 4 * secrets.randbelow(
            SUBNETS.num_addresses // 4), 30))
        if not any(subnet.overlaps(net) for net in used):
            return subnet
    raise LinkError(f"no free /30 in {SUBNETS}")


class ShapedLink:
    """The namespace ``name`` at ``server_address``, reached from here over a veth pair."""

    def __init__(self) -> None:
        suffix = secrets.token_hex(3)
        self.name = f"dkr-link-{suffix}"
        self._host_dev, self._ns_dev = f"dkrh{suffix}", f"dkrn{suffix}"
        subnet = _free_subnet()
        self.host_address, self.server_address = (str(a) for a in list(subnet.hosts())[:2])
        self.rate: str | None = None

    def __enter__(self) -> "ShapedLink":
        _ip("ip", "netns", "add", self.name)
        try:
            _ip("ip", "link", "add", self._host_dev, "type", "veth", "peer", "name", self._ns_dev)
            _ip("ip", "link", "set", self._ns_dev, "netns", self.name)
            _ip("ip", "addr", "add", f"{self.host_address}/30", "dev", self._host_dev)
            _ip("ip", "link", "set", self._host_dev, "up")
            _ip("ip", "addr", "add", f"{self.server_address}/30", "dev", self._ns_dev,
                netns=self.name)
            _ip("ip", "link", "set", self._ns_dev, "up", netns=self.name)
            _ip("ip", "link", "set", "lo", "up", netns=self.name)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        # Deleting the namespace deletes its end of the pair, and with it ours.
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        subprocess.run(["ip", "link", "del", self._host_dev], capture_output=True)

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def shape(self, rate: str | None) -> None:
        """Each direction at most ``rate`` (tc's syntax: ``100mbit``), or no limit (None).

        tbf with a burst of 1/100 s of the rate (at least 64 KiB) and 50 ms of
        queue: what a shaped uplink does, with no delay added.
        """
        for dev, netns in ((self._host_dev, None), (self._ns_dev, self.name)):
            subprocess.run((["ip", "netns", "exec", netns] if netns else []) +
                           ["tc", "qdisc", "del", "dev", dev, "root"], capture_output=True)
            if rate:
                bits = _tc_rate_bits(rate)
                burst = max(64 * 1024, bits // 8 // 100)
                _ip("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                    "burst", str(burst), "latency", "50ms", netns=netns)
        self.rate = rate


def _tc_rate_bits(rate: str) -> int:
    units = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "bit": 1}
    for unit, factor in units.items():
        if rate.endswith(unit) and rate[:-len(unit)].replace(".", "", 1).isdigit():
            return int(float(rate[:-len(unit)]) * factor)
    raise LinkError(f"rate {rate!r}: give it as NUMBER followed by kbit, mbit or gbit")
