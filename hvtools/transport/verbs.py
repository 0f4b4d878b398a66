"""The pyverbs backend: RC queue pairs set up through rdma_cm, for hosts with RDMA devices.

Connection management is librdmacm's synchronous API (rdma_getaddrinfo, rdma_listen /
rdma_get_request / rdma_accept on the target, rdma_connect on the initiator) with an external
QP: we create the PD, CQ and RC QP ourselves (IBTA vol. 1 ch. 9-10) so that work requests carry
our wr_id and scatter entries at any offset, and move the QP through INIT/RTR/RTS with the
attributes rdma_init_qp_attr gives. The HCA checks the rkey, the access rights and the range
on the TARGET (IBTA 9.7.4.1.3 "R_Key violation", 10.6.3); a violation completes the
initiator's WR with IBV_WC_REM_ACCESS_ERR and moves its QP to the Error state, which is what
Peer.failed records. RDMA needs no target CPU: the target's progress thread only accepts
connections.

Without an RDMA device (no HCA, RoCE NIC, rxe or siw: /sys/class/infiniband is empty) opening
an endpoint raises NoRdmaDeviceError naming that.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

from hvtools.errors import DependencyError, NoRdmaDeviceError, StateError, TransportError
from hvtools.transport.api import Buffer, Completion, Endpoint, MemoryRegion, Peer, RemoteRegion

_SYSFS = "/sys/class/infiniband"
DEFAULT_PORT = 7471
_QP_DEPTH = 512


def rdma_devices() -> list[str]:
    """Names of this host's RDMA devices (the list ibv_get_device_list(3) returns)."""
    return sorted(os.listdir(_SYSFS)) if os.path.isdir(_SYSFS) else []


def _pyverbs() -> Any:
    try:
        import pyverbs.cm_enums as ce
        import pyverbs.enums as e
        from pyverbs import cmid, cq, mr, pd, qp, wr
    except ImportError as err:
        raise DependencyError(
            f"pyverbs does not import ({err}): apt-get install python3-pyverbs and re-run "
            "scripts/setup-venv.sh") from err
    return {"ce": ce, "e": e, "cmid": cmid, "cq": cq, "mr": mr, "pd": pd, "qp": qp, "wr": wr}


class _Conn:
    """One RC connection: its CM id, PD-bound QP and CQ."""

    def __init__(self, cm: Any, qp: Any, cq: Any) -> None:
        self.cm = cm
        self.qp = qp
        self.cq = cq


class VerbsEndpoint(Endpoint):
    """RC endpoint through rdma_cm bound to ``address`` (an IP on an RDMA-capable netdev)."""

    backend = "verbs"
    provider = "rc"

    def __init__(self, address: str | None = None, port: int | None = None) -> None:
        if not rdma_devices():
            raise NoRdmaDeviceError(
                "no RDMA device (ibv_get_device_list is empty): the verbs backend needs an "
                "HCA, a RoCE NIC or soft-RoCE (rdma link add NAME type rxe netdev DEV)")
        if not address:
            raise TransportError("the verbs backend needs the IP address of an RDMA netdev")
        self._v = _pyverbs()
        v = self._v
        self._port = port or DEFAULT_PORT
        self.address = f"{address}:{self._port}"
        ai = v["cmid"].AddrInfo(src=address, src_service=str(self._port),
                                port_space=v["ce"].RDMA_PS_TCP, flags=v["ce"].RAI_PASSIVE)
        self._listen = v["cmid"].CMID(creator=ai)
        self._listen.listen()
        self._pd = v["pd"].PD(self._listen.context)  # MRs and every QP share this PD
        self._lock = threading.Lock()
        self._mrs: dict[int, tuple[MemoryRegion, Any]] = {}
        self._conns: list[_Conn] = []
        self._pending: dict[int, tuple[int, Peer]] = {}
        self._thread: threading.Thread | None = None
        self._stop = False
        self._closed = False

    # -- connections ----------------------------------------------------------------------
    def _new_qp(self, cm: Any) -> _Conn:
        v = self._v
        cq = v["cq"].CQ(cm.context, 2 * _QP_DEPTH)
        cap = v["qp"].QPCap(max_send_wr=_QP_DEPTH, max_recv_wr=1, max_send_sge=1,
                            max_recv_sge=1)
        init = v["qp"].QPInitAttr(qp_type=v["e"].IBV_QPT_RC, scq=cq, rcq=cq, cap=cap)
        qp = v["qp"].QP(self._pd, init)
        return _Conn(cm, qp, cq)

    def _modify(self, c: _Conn, state: int) -> None:
        """Move the QP to ``state`` with the attributes rdma_init_qp_attr(3) gives."""
        e = self._v["e"]
        attr, mask = c.cm.init_qp_attr(state)
        if state == e.IBV_QPS_INIT:
            attr.qp_access_flags = (e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_READ
                                    | e.IBV_ACCESS_REMOTE_WRITE)
        c.qp.modify(attr, mask)

    def connect(self, peer: str) -> Peer:
        self._check_open()
        v = self._v
        host, _, port = peer.rpartition(":")
        try:
            ai = v["cmid"].AddrInfo(src=self.address.rpartition(":")[0], dst=host,
                                    dst_service=port, port_space=v["ce"].RDMA_PS_TCP)
            cm = v["cmid"].CMID(creator=ai)
            c = self._new_qp(cm)
            e = v["e"]
            # rdma_connect(3) with a user QP: INIT before, RTR and RTS after, then establish.
            self._modify(c, e.IBV_QPS_INIT)
            cm.connect(v["cmid"].ConnParam(qp_num=c.qp.qp_num))
            self._modify(c, e.IBV_QPS_RTR)
            self._modify(c, e.IBV_QPS_RTS)
            cm.establish()
        except Exception as err:  # pyverbs raises PyverbsRDMAError / PyverbsError
            raise TransportError(f"rdma_connect to {peer}: {err}") from err
        self._conns.append(c)
        return Peer(peer, c)

    def _accept_loop(self) -> None:
        v = self._v
        while not self._stop:
            try:
                cm = self._listen.get_request()
            except Exception:  # listen id destroyed at close
                return
            if self._stop:
                return
            try:
                c = self._new_qp(cm)
                e = v["e"]
                # rdma_accept(3) with a user QP: INIT and RTR before, RTS once accepted.
                self._modify(c, e.IBV_QPS_INIT)
                self._modify(c, e.IBV_QPS_RTR)
                cm.accept(v["cmid"].ConnParam(qp_num=c.qp.qp_num))
                self._modify(c, e.IBV_QPS_RTS)
                self._conns.append(c)
            except Exception:  # a failed handshake must not stop serving others
                cm.close()

    # -- memory ---------------------------------------------------------------------------
    def register(self, buf: Buffer, *, remote_read: bool = True,
                 remote_write: bool = False) -> MemoryRegion:
        self._check_open()
        import ctypes

        e = self._v["e"]
        view = memoryview(buf)
        if view.readonly:
            raise TransportError("cannot register: the buffer must be writable")
        base = ctypes.addressof(ctypes.c_char.from_buffer(view))
        access = e.IBV_ACCESS_LOCAL_WRITE
        access |= e.IBV_ACCESS_REMOTE_READ if remote_read else 0
        access |= e.IBV_ACCESS_REMOTE_WRITE if remote_write else 0
        try:
            vmr = self._v["mr"].MR(self._pd, len(view), access, address=base)
        except Exception as err:
            raise TransportError(f"ibv_reg_mr of {len(view)} bytes: {err}") from err
        mr = MemoryRegion(buf, base, len(view), vmr.rkey, remote_read=remote_read,
                          remote_write=remote_write, handle=(vmr, view))
        self._mrs[id(mr)] = (mr, vmr)
        return mr

    def deregister(self, mr: MemoryRegion) -> None:
        entry = self._mrs.pop(id(mr), None)
        if entry is None:
            raise StateError(f"{mr!r} is not registered with this endpoint")
        entry[1].close()

    # -- data path ------------------------------------------------------------------------
    def post_read(self, peer: Peer, local: MemoryRegion, local_off: int, remote: RemoteRegion,
                  remote_off: int, length: int, context: int) -> bool:
        return self._post(False, peer, local, local_off, remote, remote_off, length, context)

    def post_write(self, peer: Peer, local: MemoryRegion, local_off: int, remote: RemoteRegion,
                   remote_off: int, length: int, context: int) -> bool:
        return self._post(True, peer, local, local_off, remote, remote_off, length, context)

    def _post(self, write: bool, peer: Peer, local: MemoryRegion, local_off: int,
              remote: RemoteRegion, remote_off: int, length: int, context: int) -> bool:
        self._check_open()
        if peer.failed is not None:
            raise TransportError(f"connection to {peer.address} is broken by an earlier error "
                                 f"({peer.failed}); open a new endpoint")
        entry = self._mrs.get(id(local))
        if entry is None:
            raise StateError(f"{local!r} is not registered with this endpoint")
        if length <= 0 or local_off < 0 or local_off + length > local.length:
            raise TransportError(f"local range [{local_off}, +{length}) outside {local!r}")
        c: _Conn = peer.handle  # type: ignore[assignment]
        if sum(1 for _, p in self._pending.values() if p is peer) >= _QP_DEPTH:
            return False
        v = self._v
        e = v["e"]
        sge = v["wr"].SGE(local.addr + local_off, length, entry[1].lkey)
        op = e.IBV_WR_RDMA_WRITE if write else e.IBV_WR_RDMA_READ
        w = v["wr"].SendWR(wr_id=context, opcode=op, num_sge=1, sg=[sge],
                           send_flags=e.IBV_SEND_SIGNALED)
        w.set_wr_rdma(remote.key, remote.addr + remote_off)
        try:
            c.qp.post_send(w)
        except Exception as err:
            raise TransportError(f"ibv_post_send to {peer.address}: {err}") from err
        self._pending[context] = (length, peer)
        return True

    def poll(self, max_entries: int = 64, timeout: float = 0.0) -> list[Completion]:
        import time

        self._check_open()
        e = self._v["e"]
        deadline = time.monotonic() + timeout
        out: list[Completion] = []
        while True:
            for c in list(self._conns):
                n, wcs = c.cq.poll(max_entries - len(out))
                for wc in wcs[:n]:
                    length, peer = self._pending.pop(wc.wr_id, (0, None))
                    if wc.status == e.IBV_WC_SUCCESS:
                        out.append(Completion(wc.wr_id, True, None, length))
                    else:
                        text = f"work completion status {wc.status} (vendor {wc.vendor_err})"
                        if peer is not None and peer.failed is None:
                            peer.failed = text
                        out.append(Completion(wc.wr_id, False, text))
            if out or time.monotonic() >= deadline:
                return out
            time.sleep(0.0002)

    # -- progress / lifetime --------------------------------------------------------------
    def start_progress(self) -> None:
        self._check_open()
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                            name=f"hvt-verbs-accept-{self.address}")
            self._thread.start()

    def stop_progress(self) -> None:
        # get_request blocks in the kernel; the thread ends when close() destroys the id.
        self._stop = True

    @property
    def max_outstanding(self) -> int:
        return _QP_DEPTH

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop = True
        for c in self._conns:
            for obj in (c.qp, c.cq, c.cm):
                with contextlib.suppress(Exception):  # best effort: the peer may be gone
                    obj.close()
        for _, vmr in self._mrs.values():
            vmr.close()
        self._mrs.clear()
        self._pd.close()
        self._listen.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StateError(f"transport endpoint {self.address} is closed")
