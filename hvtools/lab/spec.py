"""The lab spec: which hosts, their addresses on the private link, and the link kind.

A lab is a TOML file::

    name = "lab"              # names the lab's namespaces, state dir and memory dir
    link = "veth"             # "veth" over a bridge, or "rxe" (soft-RoCE over that veth)
    subnet = "10.77.0.0/24"
    libvirt = false           # also run a libvirtd + virtlogd per host

    [[host]]
    name = "h1"
    address = "10.77.0.1"     # or "10.77.0.1/24"; must lie in the subnet

Without a file the default lab is :data:`DEFAULT_LAB_TOML`. Every error names the key at fault
(:class:`~hvtools.errors.SpecError`), before anything is built.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvtools.errors import SpecError, UsageError

LINK_KINDS = ("veth", "rxe")
#: The port every host agent serves JSON-lines RPC on, at its host's address.
AGENT_PORT = 7470
#: Lab names become netns names and paths; host names also end up in interface names
#: (IFNAMSIZ is 16 with the NUL, netdevice(7)), so ``v-<host>`` must fit in 15 bytes.
_LAB_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,23}$")
_HOST_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,12}$")

DEFAULT_LAB_TOML = """\
name = "lab"
link = "veth"
subnet = "10.77.0.0/24"

[[host]]
name = "h1"
address = "10.77.0.1"

[[host]]
name = "h2"
address = "10.77.0.2"
"""


@dataclass(frozen=True)
class HostSpec:
    """One lab host: its name and its address on the lab link."""

    name: str
    address: str  # dotted quad, no prefix
    prefixlen: int

    def to_mapping(self) -> dict[str, Any]:
        return {"name": self.name, "address": self.address}


@dataclass(frozen=True)
class LabSpec:
    """A validated lab spec."""

    name: str
    link: str
    subnet: str
    hosts: tuple[HostSpec, ...] = field(default_factory=tuple)
    libvirt: bool = False

    def host(self, name: str) -> HostSpec:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def to_mapping(self) -> dict[str, Any]:
        return {"name": self.name, "link": self.link, "subnet": self.subnet,
                "libvirt": self.libvirt, "host": [h.to_mapping() for h in self.hosts]}

    def to_toml(self) -> str:
        lines = [f'name = "{self.name}"', f'link = "{self.link}"', f'subnet = "{self.subnet}"',
                 f"libvirt = {'true' if self.libvirt else 'false'}"]
        for h in self.hosts:
            lines += ["", "[[host]]", f'name = "{h.name}"', f'address = "{h.address}"']
        return "\n".join(lines) + "\n"


_TOP_KEYS = {"name", "link", "subnet", "libvirt", "host"}
_HOST_KEYS = {"name", "address"}


def _str(data: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise SpecError(where + key, f"must be a string, not {type(value).__name__}"
                        if value is not None else "is required")
    return value


def lab_from_mapping(data: dict[str, Any]) -> LabSpec:
    """Validate a parsed lab spec; SpecError names the offending key."""
    for key in data:
        if key not in _TOP_KEYS:
            raise SpecError(key, f"unknown key (known: {', '.join(sorted(_TOP_KEYS))})")
    name = _str(data, "name", "", "lab")
    if not _LAB_NAME.match(name):
        raise SpecError("name", f"{name!r} must be 1-24 of a-z, 0-9 and '-', starting "
                        "with a letter or digit")
    link = _str(data, "link", "", "veth")
    if link not in LINK_KINDS:
        raise SpecError("link", f"{link!r} is not one of {', '.join(LINK_KINDS)}")
    subnet_text = _str(data, "subnet", "", "10.77.0.0/24")
    try:
        subnet = ipaddress.IPv4Network(subnet_text, strict=True)
    except ValueError as err:
        raise SpecError("subnet", f"{subnet_text!r} is not an IPv4 network: {err}") from err
    libvirt = data.get("libvirt", False)
    if not isinstance(libvirt, bool):
        raise SpecError("libvirt", "must be true or false")
    raw_hosts = data.get("host")
    if raw_hosts is None:
        raise SpecError("host", "a lab needs at least one host table")
    if not isinstance(raw_hosts, list) or not all(isinstance(h, dict) for h in raw_hosts):
        raise SpecError("host", "must be an array of host tables")
    if not raw_hosts:
        raise SpecError("host", "a lab needs at least one host table")
    hosts: list[HostSpec] = []
    for i, raw in enumerate(raw_hosts):
        where = f"host #{i + 1} "
        for key in raw:
            if key not in _HOST_KEYS:
                raise SpecError(where + key,
                                f"unknown key (known: {', '.join(sorted(_HOST_KEYS))})")
        hname = _str(raw, "name", where)
        if not _HOST_NAME.match(hname):
            raise SpecError(where + "name", f"{hname!r} must be 1-13 of a-z, 0-9 and '-', "
                            "starting with a letter or digit")
        if hname == "sw":
            raise SpecError(where + "name", "'sw' is reserved for the lab's switch namespace")
        addr_text = _str(raw, "address", where)
        try:
            iface = ipaddress.IPv4Interface(addr_text if "/" in addr_text
                                            else f"{addr_text}/{subnet.prefixlen}")
        except ValueError as err:
            raise SpecError(where + "address", f"{addr_text!r} is not an IPv4 address") from err
        if iface.network != subnet or iface.ip in (subnet.network_address,
                                                   subnet.broadcast_address):
            raise SpecError(where + "address", f"{addr_text} is not a host address in "
                            f"subnet {subnet}")
        if any(h.name == hname for h in hosts):
            raise SpecError(where + "name", f"host {hname!r} is named twice")
        if any(h.address == str(iface.ip) for h in hosts):
            raise SpecError(where + "address", f"{iface.ip} is used twice")
        hosts.append(HostSpec(hname, str(iface.ip), subnet.prefixlen))
    return LabSpec(name=name, link=link, subnet=str(subnet), hosts=tuple(hosts),
                   libvirt=libvirt)


def parse_lab_toml(text: str, source: str = "<lab spec>") -> LabSpec:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"{source}: not valid TOML: {err}") from err
    return lab_from_mapping(data)


def read_lab_spec(path: Path | None) -> LabSpec:
    """The lab spec in ``path``, or the default two-host lab when ``path`` is None."""
    if path is None:
        return parse_lab_toml(DEFAULT_LAB_TOML, "default lab")
    try:
        text = path.read_text()
    except OSError as err:
        raise UsageError(f"cannot read lab spec {path}: {err.strerror or err}") from err
    try:
        return parse_lab_toml(text, str(path))
    except SpecError as err:
        raise SpecError(f"{path}: {err.field}", str(err).partition(": ")[2]) from err
