"""Client side of a lab: find a lab that is up, name its hosts, call their agents.

Where a lab keeps things (``<lab>`` and ``<host>`` are the spec's names)::

    $HVTOOLS_HOME/lab/<lab>/lab.json             what `lab up` built (spec, link, fallback)
    $HVTOOLS_HOME/lab/<lab>/<host>/              the host's state dir: agent.sock, agent.pid,
                                                 agent.log (and, with libvirt = true, the
                                                 host's private etc/, var/, run/ libvirt trees)
    /dev/shm/hvtools/<home-slug>/lab-<lab>/<host>/   the host's memory: its VMs' RAM files
    netns hv-<lab>-<host>, hv-<lab>-sw               the host, and the switch holding the bridge

The agent protocol is JSON lines: ``{"id": n, "method": m, "params": {...}}`` answered by
``{"id": n, "result": ...}`` or ``{"id": n, "error": {"type": ..., "message": ...}}``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from hvtools import errors, paths
from hvtools.errors import HostDownError, HvError, RemoteCallError, StateError, UnknownHostError
from hvtools.lab.spec import AGENT_PORT, HostSpec, LabSpec, lab_from_mapping

#: The lab a command uses when none is named: $HVTOOLS_LAB, else "lab", else the only one up.
LAB_ENV = "HVTOOLS_LAB"
DEFAULT_LAB = "lab"
DEFAULT_CALL_TIMEOUT = 60.0


# -- names and places ---------------------------------------------------------------------------
def labs_root() -> Path:
    return paths.home() / "lab"


def lab_dir(lab: str) -> Path:
    return labs_root() / lab


def host_dir(lab: str, host: str) -> Path:
    """The host's state dir (its agent's socket, pid and log)."""
    return lab_dir(lab) / host


def _home_slug() -> str:
    return paths.home().as_posix().strip("/").replace("/", "-")


def lab_memory_root(lab: str) -> Path:
    return Path("/dev/shm/hvtools") / _home_slug() / f"lab-{lab}"


def memory_dir(lab: str, host: str) -> Path:
    """Where the RAM files of VMs on ``host`` live (tmpfs: the host's "physical memory")."""
    return lab_memory_root(lab) / host


def netns_name(lab: str, host: str) -> str:
    return f"hv-{lab}-{host}"


def switch_netns(lab: str) -> str:
    """The namespace holding the lab's bridge, so the root namespace is never touched."""
    return f"hv-{lab}-sw"


def netns_path(name: str) -> Path:
    return Path("/run/netns") / name


# -- RPC ----------------------------------------------------------------------------------------
def _exchange(sock: socket.socket, method: str, params: dict[str, Any], timeout: float,
              where: str) -> Any:
    sock.settimeout(timeout)
    request = {"id": 1, "method": method, "params": params}
    sock.sendall(json.dumps(request).encode() + b"\n")
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            raise HostDownError(f"{where}: the agent closed the connection during {method}")
        buf += chunk
    reply = json.loads(buf)
    if "error" in reply:
        e = reply["error"]
        raise remote_error(where, method, str(e.get("type", "Error")), str(e.get("message")))
    return reply.get("result")


def remote_error(host: str, method: str, err_type: str, message: str) -> HvError:
    """An HvError the agent raised comes back as the same class when it takes one message
    (so a remote UsageError still exits 2); anything else is a RemoteCallError."""
    cls = getattr(errors, err_type, None)
    if isinstance(cls, type) and issubclass(cls, HvError) and cls is not RemoteCallError:
        with contextlib.suppress(TypeError):
            return cls(f"{host}: {message}")
    return RemoteCallError(host, method, err_type, message)


def rpc_unix(path: Path, method: str, params: dict[str, Any] | None = None, *,
             timeout: float = DEFAULT_CALL_TIMEOUT, where: str = "") -> Any:
    """One RPC to an agent on its unix socket. HostDownError when nothing answers."""
    where = where or str(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(min(timeout, 5.0))
        try:
            sock.connect(str(path))
        except OSError as err:
            raise HostDownError(f"{where}: agent not answering on {path} "
                                f"({err.strerror or err})") from err
        return _call(sock, method, params, timeout, where)


def _call(sock: socket.socket, method: str, params: dict[str, Any] | None, timeout: float,
          where: str) -> Any:
    """One exchange on a connected socket; a silent or broken agent is HostDownError."""
    try:
        return _exchange(sock, method, params or {}, timeout, where)
    except TimeoutError as err:
        raise HostDownError(f"{where}: agent did not answer {method} within "
                            f"{timeout:.0f}s") from err
    except (ConnectionError, json.JSONDecodeError) as err:
        raise HostDownError(f"{where}: agent connection broke during {method}: {err}") \
            from err


def rpc_tcp(address: str, method: str, params: dict[str, Any] | None = None, *,
            port: int = AGENT_PORT, timeout: float = DEFAULT_CALL_TIMEOUT,
            where: str = "") -> Any:
    """One RPC to an agent over TCP. Works from inside a lab host's netns (the lab link is not
    routed from the root namespace)."""
    where = where or f"{address}:{port}"
    try:
        sock = socket.create_connection((address, port), timeout=min(timeout, 5.0))
    except OSError as err:
        raise HostDownError(f"{where}: agent not reachable at {address}:{port} "
                            f"({err.strerror or err})") from err
    with sock:
        return _call(sock, method, params, timeout, where)


# -- processes in a namespace -------------------------------------------------------------------
#: setns(2) flag: join a network namespace (linux/sched.h).
CLONE_NEWNET = 0x40000000


def _setns_fn() -> Callable[[int, int], int]:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fn: Callable[[int, int], int] = libc.setns
    return fn


def popen_in_netns(netns: str, argv: Sequence[str], *, detach: bool = False,
                   stdin: int | IO[Any] | None = subprocess.DEVNULL,
                   stdout: int | IO[Any] | None = None, stderr: int | IO[Any] | None = None,
                   cwd: Path | None = None, env: dict[str, str] | None = None,
                   ) -> subprocess.Popen[bytes]:
    """Start ``argv`` inside ``netns``; ``detach`` gives it its own session (it outlives us).

    The namespace file is opened here, so a missing namespace fails in the caller, cleanly;
    the child joins it with setns(2) before exec (the ``ip netns exec`` way, minus its private
    /sys mount). Nothing is imported in the child between fork and exec.
    """
    try:
        fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise HostDownError(f"network namespace {netns} does not exist "
                            f"({err.strerror or err})") from err
    setns = _setns_fn()

    def preexec() -> None:
        if setns(fd, CLONE_NEWNET) != 0:
            raise OSError(f"setns({netns}) failed")

    try:
        return subprocess.Popen(list(argv), stdin=stdin, stdout=stdout, stderr=stderr,
                                cwd=cwd, env=env, preexec_fn=preexec,
                                start_new_session=detach, close_fds=True)
    finally:
        os.close(fd)


def run_in_netns(netns: str, argv: Sequence[str], *, timeout: float = 60.0,
                 check: bool = False) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` inside ``netns`` and wait for it."""
    proc = popen_in_netns(netns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=timeout)
    res = subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
    if check:
        res.check_returncode()
    return res


def netns_inode(netns: str) -> int | None:
    try:
        return os.stat(netns_path(netns)).st_ino
    except OSError:
        return None


# -- process checks -----------------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    """Alive and not a zombie (proc(5): state field after the comm)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def cmdline_of(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


# -- handles ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HostHandle:
    """One host of a lab that is up: where it lives and how to talk to its agent."""

    lab: str
    spec: HostSpec

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def address(self) -> str:
        return self.spec.address

    @property
    def netns(self) -> str:
        return netns_name(self.lab, self.name)

    @property
    def state_dir(self) -> Path:
        return host_dir(self.lab, self.name)

    @property
    def memory_dir(self) -> Path:
        return memory_dir(self.lab, self.name)

    @property
    def agent_socket(self) -> Path:
        return self.state_dir / "agent.sock"

    @property
    def libvirt_uri(self) -> str:
        """The host's own libvirtd (labs built with ``libvirt = true``)."""
        sock = self.state_dir / "run" / "libvirt" / "libvirt-sock"
        return f"qemu+unix:///system?socket={sock}"

    @property
    def agent_pid(self) -> int | None:
        """The agent's pid if that process is alive and is this host's agent."""
        try:
            pid = int((self.state_dir / "agent.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        if not pid_alive(pid):
            return None
        cmd = cmdline_of(pid)
        return pid if b"hvtools.lab.agent" in cmd and str(self.state_dir).encode() in cmd \
            else None

    @property
    def failed(self) -> bool:
        """Whether the host went through ``hvtools host fail`` (hvtools.migration.hostops)
        and was not revived: its CPUs are gone, only its memory and NIC serve."""
        return (self.state_dir / "failed.json").exists()

    @property
    def up(self) -> bool:
        """Whether the agent answers a ping now."""
        try:
            self.call("ping", timeout=5.0)
        except HostDownError:
            return False
        return True

    def call(self, method: str, /, *, timeout: float = DEFAULT_CALL_TIMEOUT,
             **params: Any) -> Any:
        """Call ``method`` on this host's agent (unix socket). HostDownError if it is down;
        an error the method raised comes back as an HvError (see :func:`remote_error`)."""
        return rpc_unix(self.agent_socket, method, params, timeout=timeout, where=self.name)

    def request(self, method: str, params: dict[str, Any], *,
                timeout: float = DEFAULT_CALL_TIMEOUT) -> Any:
        """Like :meth:`call` with the params as one dict (for a param named ``timeout``)."""
        return rpc_unix(self.agent_socket, method, params, timeout=timeout, where=self.name)

    def call_tcp(self, method: str, /, *, timeout: float = DEFAULT_CALL_TIMEOUT,
                 **params: Any) -> Any:
        """Call this host's agent over the lab link (from inside another host's netns)."""
        return rpc_tcp(self.address, method, params, timeout=timeout, where=self.name)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start a process inside this host's netns (see :func:`popen_in_netns`)."""
        return popen_in_netns(self.netns, argv, **kwargs)

    def run(self, argv: Sequence[str], *, timeout: float = 60.0,
            check: bool = False) -> subprocess.CompletedProcess[bytes]:
        return run_in_netns(self.netns, argv, timeout=timeout, check=check)


@dataclass(frozen=True)
class Lab:
    """A lab that `lab up` built (read back from its ``lab.json``)."""

    spec: LabSpec
    record: dict[str, Any]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def hosts(self) -> list[HostHandle]:
        return [HostHandle(self.name, h) for h in self.spec.hosts]

    @property
    def link(self) -> str:
        """The link kind in use (``veth`` when ``rxe`` fell back)."""
        return str(self.record.get("link", self.spec.link))

    @property
    def link_fallback(self) -> str | None:
        reason = self.record.get("link_fallback")
        return str(reason) if reason else None

    def host(self, name: str) -> HostHandle:
        try:
            return HostHandle(self.name, self.spec.host(name))
        except KeyError:
            known = ", ".join(h.name for h in self.spec.hosts)
            raise UnknownHostError(f"lab {self.name!r} has no host {name!r} "
                                   f"(hosts: {known})") from None


def labs_up() -> list[str]:
    """Names of the labs that have a built record, sorted."""
    root = labs_root()
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if (d / "lab.json").is_file())


def read_record(name: str) -> dict[str, Any] | None:
    try:
        data = json.loads((lab_dir(name) / "lab.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def resolve_lab_name(name: str | None) -> str:
    """The lab a command means: ``name``, else $HVTOOLS_LAB, else "lab" or the only one up."""
    if name:
        return name
    env = os.environ.get(LAB_ENV)
    if env:
        return env
    up = labs_up()
    if DEFAULT_LAB in up or not up:
        return DEFAULT_LAB
    if len(up) == 1:
        return up[0]
    raise StateError(f"several labs are up ({', '.join(up)}): name one "
                     f"(--lab NAME or {LAB_ENV}=NAME)")


def load_lab(name: str | None = None) -> Lab:
    """The lab ``name`` (see :func:`resolve_lab_name`); StateError when it is not up."""
    lab = resolve_lab_name(name)
    record = read_record(lab)
    if record is None:
        raise StateError(f"lab {lab!r} is not up (hvtools lab up)")
    try:
        spec = lab_from_mapping(record["spec"])
    except (KeyError, TypeError, HvError) as err:
        raise StateError(f"lab {lab!r}: {lab_dir(lab) / 'lab.json'} is damaged ({err}); "
                         f"run `hvtools lab down --lab {lab}`") from err
    return Lab(spec, record)


def resolve_host(text: str) -> HostHandle:
    """``HOST`` (in the default lab) or ``LAB/HOST``: the host, which must be up.

    UnknownHostError for a host the lab lacks; StateError when the lab is not up;
    HostDownError when its agent does not answer.
    """
    lab_name, _, host_name = text.rpartition("/")
    host = load_lab(lab_name or None).host(host_name)
    if not host.up:
        raise HostDownError(f"host {host.name} of lab {host.lab!r} is down: its agent does not "
                            f"answer (hvtools lab status)")
    return host
