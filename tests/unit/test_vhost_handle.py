"""The backend's message handler: every refused message is a VhostError, no fd is leaked."""

from __future__ import annotations

import contextlib
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvtools.errors import VhostError
from hvtools.vhost import protocol as P
from hvtools.vhost.server import BlkBackend


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> BlkBackend:
    disk = tmp_path_factory.mktemp("vub") / "disk.img"
    disk.write_bytes(b"\0" * (1 << 20))
    return BlkBackend(disk)


def _msg(req: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> P.Message:
    return P.decode(P.Header(req, P.VERSION, len(payload)), payload, fds)


@pytest.mark.parametrize("req", [P.Request.GET_STATUS, P.Request.GET_MAX_MEM_SLOTS])
def test_unserved_requests_are_refused_not_crashed(backend: BlkBackend, req: int) -> None:
    with pytest.raises(VhostError):
        backend.handle(_msg(req))


@pytest.mark.parametrize("req", [P.Request.SET_VRING_KICK, P.Request.SET_VRING_CALL,
                                 P.Request.SET_VRING_ERR])
def test_an_fd_for_a_queue_that_does_not_exist_is_closed(backend: BlkBackend, req: int) -> None:
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(VhostError):
        backend.handle(_msg(req, struct.pack("<Q", 5), (r,)))
    with pytest.raises(OSError):
        os.fstat(r)  # the refused message's fd was closed, not leaked


_BODIES = st.one_of(st.binary(max_size=64), st.integers(0, 2**64 - 1).map(
    lambda v: struct.pack("<Q", v)))


@settings(max_examples=1500, deadline=None)
@given(req=st.sampled_from(list(P.Request)), body=_BODIES, nfds=st.integers(0, 2))
def test_fuzz_handle_raises_only_vhost_error_and_leaks_no_fd(backend: BlkBackend, req: int,
                                                              body: bytes, nfds: int) -> None:
    before = _open_fds()
    fds = tuple(os.open("/dev/null", os.O_RDONLY) for _ in range(nfds))
    try:
        msg = P.decode(P.Header(req, P.VERSION, len(body)), body, fds)
    except VhostError:
        for fd in fds:
            os.close(fd)  # decode leaves the fds to its caller
        return
    try:
        backend.handle(msg)
    except VhostError:
        # The server's rule: fds of a refused message that the handler did not take are
        # closed by the server; the ones it took are released by disconnect().
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
    backend.disconnect()
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    assert _open_fds() <= before
