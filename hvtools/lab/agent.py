"""The host agent: ``python -m hvtools.lab.agent STATE_DIR``, one per lab host.

`lab up` starts it detached (its own session) inside the host's network namespace, logging to
``STATE_DIR/agent.log``. It reads ``STATE_DIR/host.json`` (the lab spec and its host's name) and
serves JSON-lines RPC (see :mod:`hvtools.lab.hosts`) on ``STATE_DIR/agent.sock`` and on TCP
``<host address>:7470``, so one host's agent can call another's across the lab link.

Built-in methods: ``ping``, ``status``, ``probe_peer``. Other packages add theirs through the
extension point: at start the agent imports ``hvtools.migration.hostops`` (when it exists) and
calls ``hostops.register(agent)``, which calls :meth:`HostAgent.add_method`. Every method runs
in a worker thread (one per connection) and takes the request's params dict.

SIGTERM or SIGINT: stop serving, remove the sockets, exit 0.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import os
import signal
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from hvtools.errors import HostDownError, HvError, UsageError
from hvtools.lab.hosts import memory_dir, rpc_tcp
from hvtools.lab.spec import AGENT_PORT, HostSpec, LabSpec, lab_from_mapping

log = logging.getLogger("hvtools.lab.agent")

Method = Callable[[dict[str, Any]], Any]
#: The module that registers the migration methods (owned by hvtools.migration).
EXTENSION_MODULE = "hvtools.migration.hostops"


class _Handler(socketserver.StreamRequestHandler):
    """One connection: read request lines, answer each with one line, in order."""

    server: _UnixServer | _TcpServer

    def handle(self) -> None:
        agent = self.server.agent
        for line in self.rfile:
            if not line.strip():
                continue
            reply = agent.dispatch(line)
            try:
                self.wfile.write(json.dumps(reply, default=str).encode() + b"\n")
                self.wfile.flush()
            except OSError:
                return


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    agent: HostAgent


class _TcpServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    agent: HostAgent


class HostAgent:
    """A lab host's agent. ``lab``, ``host`` and ``state_dir`` are for method authors."""

    def __init__(self, lab: LabSpec, host: HostSpec, state_dir: Path) -> None:
        self.lab = lab
        self.host = host
        self.state_dir = state_dir
        self.memory_dir = memory_dir(lab.name, host.name)
        self.socket_path = state_dir / "agent.sock"
        self.started_at = time.time()
        self.extensions: list[str] = []
        self._methods: dict[str, Method] = {}
        self._servers: list[socketserver.BaseServer] = []
        self._stop = threading.Event()
        self.add_method("ping", self._ping)
        self.add_method("status", self._status)
        self.add_method("probe_peer", self._probe_peer)

    # -- extension point ------------------------------------------------------------------------
    def add_method(self, name: str, fn: Method) -> None:
        """Serve ``fn(params) -> JSON-able`` as RPC method ``name`` (runs in a worker thread)."""
        if name in self._methods:
            raise UsageError(f"agent method {name!r} is already registered")
        self._methods[name] = fn

    @property
    def methods(self) -> list[str]:
        return sorted(self._methods)

    def load_extensions(self) -> None:
        if importlib.util.find_spec(EXTENSION_MODULE) is None:
            log.info("no %s: serving the built-in methods only", EXTENSION_MODULE)
            return
        module = importlib.import_module(EXTENSION_MODULE)
        module.register(self)
        self.extensions.append(EXTENSION_MODULE)
        log.info("registered %s", EXTENSION_MODULE)

    # -- built-in methods -----------------------------------------------------------------------
    def _ping(self, _params: dict[str, Any]) -> dict[str, Any]:
        return {"host": self.host.name, "pid": os.getpid(), "time": time.time()}

    def _status(self, _params: dict[str, Any]) -> dict[str, Any]:
        return {"lab": self.lab.name, "host": self.host.name, "address": self.host.address,
                "pid": os.getpid(), "netns_inode": os.stat("/proc/self/ns/net").st_ino,
                "uptime_s": round(time.time() - self.started_at, 3),
                "memory_dir": str(self.memory_dir), "methods": self.methods,
                "extensions": self.extensions}

    def _probe_peer(self, params: dict[str, Any]) -> dict[str, Any]:
        """Ping another agent over TCP across the lab link: ``{"address": ..., "port": ...}``."""
        address = params.get("address")
        if not isinstance(address, str):
            raise UsageError("probe_peer needs params.address")
        port = int(params.get("port", AGENT_PORT))
        t0 = time.monotonic()
        try:
            reply = rpc_tcp(address, "ping", port=port, timeout=float(params.get("timeout", 5)))
        except HostDownError as err:
            return {"address": address, "ok": False, "error": str(err)}
        return {"address": address, "ok": True, "host": reply.get("host"),
                "rtt_ms": round((time.monotonic() - t0) * 1000, 3)}

    # -- serving --------------------------------------------------------------------------------
    def dispatch(self, line: bytes) -> dict[str, Any]:
        """One request line → one reply object; a method's exception becomes an error reply."""
        req_id: Any = None
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise UsageError("a request must be a JSON object")
            req_id = req.get("id")
            method = req.get("method")
            params = req.get("params") or {}
            if not isinstance(params, dict):
                raise UsageError("params must be a JSON object")
            fn = self._methods.get(str(method))
            if fn is None:
                raise UsageError(f"unknown method {method!r} (known: {', '.join(self.methods)})")
            return {"id": req_id, "result": fn(params)}
        except json.JSONDecodeError as err:
            return {"id": None, "error": {"type": "UsageError", "message": f"not JSON: {err}"}}
        except Exception as err:  # the caller gets it; the agent keeps serving
            if not isinstance(err, HvError):
                log.exception("method failed")
            return {"id": req_id, "error": {"type": type(err).__name__, "message": str(err)}}

    def serve(self) -> None:
        """Bind both sockets, serve until SIGTERM/SIGINT, then remove the sockets."""
        self.socket_path.unlink(missing_ok=True)
        unix = _UnixServer(str(self.socket_path), _Handler)
        unix.agent = self
        self._servers.append(unix)
        try:
            tcp = _TcpServer((self.host.address, AGENT_PORT), _Handler)
        except OSError:
            unix.server_close()
            self.socket_path.unlink(missing_ok=True)
            raise
        tcp.agent = self
        self._servers.append(tcp)
        threads = [threading.Thread(target=s.serve_forever, name=type(s).__name__, daemon=True)
                   for s in self._servers]
        for t in threads:
            t.start()
        log.info("agent %s/%s serving on %s and %s:%d (pid %d)", self.lab.name, self.host.name,
                 self.socket_path, self.host.address, AGENT_PORT, os.getpid())
        try:
            self._stop.wait()
        finally:
            self.shutdown()

    def request_stop(self, signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        self._stop.set()

    def shutdown(self) -> None:
        for s in self._servers:
            s.shutdown()
            s.server_close()
        self._servers.clear()
        self.socket_path.unlink(missing_ok=True)


def main(state_dir: Path) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    info = json.loads((state_dir / "host.json").read_text())
    lab = lab_from_mapping(info["lab"])
    agent = HostAgent(lab, lab.host(info["host"]), state_dir)
    signal.signal(signal.SIGTERM, agent.request_stop)
    signal.signal(signal.SIGINT, agent.request_stop)
    agent.load_extensions()
    with contextlib.suppress(KeyboardInterrupt):
        agent.serve()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m hvtools.lab.agent STATE_DIR")
    sys.exit(main(Path(sys.argv[1])))
