"""vhost-user message decoding (hvtools.vhost.protocol): known messages, refusals, fuzz."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvtools.errors import VhostError
from hvtools.vhost import protocol as P


def _msg(req: int, body: bytes = b"", fds: tuple[int, ...] = (), flags: int | None = None
         ) -> P.Message:
    raw = P.encode_request(req, body, flags=flags)
    return P.decode(P.decode_header(raw[:P.HEADER_SIZE]), raw[P.HEADER_SIZE:], fds)


def test_get_features_and_need_reply() -> None:
    m = _msg(P.Request.GET_FEATURES, flags=P.VERSION | P.FLAG_NEED_REPLY)
    assert m.request == P.Request.GET_FEATURES and m.payload is None and m.header.need_reply


def test_mem_table_two_regions_with_fds() -> None:
    regions = [P.MemRegion(0, 0xA0000, 0x7F0000000000, 0),
               P.MemRegion(0x100000, 0x1000000, 0x7F0000100000, 0x100000)]
    m = _msg(P.Request.SET_MEM_TABLE, P.mem_table(regions), fds=(10, 11))
    assert m.payload == tuple(regions)


def test_vring_addr_and_kick_nofd() -> None:
    a = P.VringAddr(0, P.VHOST_VRING_F_LOG, 1, 2, 3, 0x1234000)
    assert _msg(P.Request.SET_VRING_ADDR, P.vring_addr(a)).payload == a
    assert _msg(P.Request.SET_VRING_KICK, P.u64(P.VRING_NOFD_MASK)).payload == P.VRING_NOFD_MASK
    assert _msg(P.Request.SET_VRING_CALL, P.u64(0), fds=(5,)).payload == 0


def test_log_base_and_config() -> None:
    assert _msg(P.Request.SET_LOG_BASE, struct.pack("<QQ", 4096, 0), fds=(3,)).payload == \
        P.LogBase(4096, 0)
    cfg = _msg(P.Request.GET_CONFIG, struct.pack("<III", 0, 4, 0) + b"\0" * 4).payload
    assert cfg == P.ConfigSpace(0, 4, 0, b"\0" * 4)


@pytest.mark.parametrize(("raw", "why"), [
    (b"\x01\x00\x00\x00\x01\x00", "truncated"),
    (struct.pack("<III", 1, 2, 0), "version"),
    (struct.pack("<III", 1, P.VERSION | P.FLAG_REPLY, 0), "reply flag"),
    (struct.pack("<III", 1, P.VERSION, P.MAX_PAYLOAD + 1), "payload of"),
])
def test_bad_headers(raw: bytes, why: str) -> None:
    with pytest.raises(VhostError, match=why):
        P.decode_header(raw)


@pytest.mark.parametrize(("req", "body", "fds", "why"), [
    (999, b"", (), "unknown"),
    (P.Request.SET_FEATURES, b"\0" * 4, (), "expected 8"),
    (P.Request.SET_VRING_CALL, P.u64(0), (), "0 fds attached, expected 1"),
    (P.Request.SET_VRING_KICK, P.u64(P.VRING_NOFD_MASK), (7,), "1 fds attached, expected 0"),
    (P.Request.SET_MEM_TABLE, P.mem_table([P.MemRegion(0, 4096, 0, 0)]), (), "0 fds"),
    (P.Request.SET_MEM_TABLE, struct.pack("<II", 9, 0), (), "9 regions"),
    (P.Request.SET_MEM_TABLE, P.mem_table([P.MemRegion(0, 8192, 0, 0),
                                           P.MemRegion(4096, 4096, 0, 0)]), (1, 2), "overlap"),
    (P.Request.SET_LOG_BASE, struct.pack("<QQ", 1, 0), (), "0 fds"),
    (P.Request.GET_CONFIG, struct.pack("<III", 0, 300, 0), (), "beyond"),
    (P.Request.IOTLB_MSG, b"", (), "unsupported"),
])
def test_refusals(req: int, body: bytes, fds: tuple[int, ...], why: str) -> None:
    with pytest.raises(VhostError, match=why):
        _msg(req, body, fds)


def test_payload_size_mismatch() -> None:
    h = P.decode_header(struct.pack("<III", P.Request.SET_FEATURES, P.VERSION, 8))
    with pytest.raises(VhostError, match="header says 8"):
        P.decode(h, b"\0" * 4)


_requests = st.one_of(st.sampled_from([int(r) for r in P.Request]), st.integers(0, 2**32 - 1))


@settings(max_examples=3000, deadline=None)
@given(req=_requests, flags=st.integers(0, 2**32 - 1), body=st.binary(max_size=400),
       nfds=st.integers(0, 10), size_delta=st.integers(-3, 3))
def test_fuzz_decode_only_raises_vhost_error(req: int, flags: int, body: bytes, nfds: int,
                                             size_delta: int) -> None:
    size = max(0, len(body) + size_delta)
    raw = struct.pack("<III", req, flags, size)
    try:
        h = P.decode_header(raw)
        m = P.decode(h, body, tuple(range(100, 100 + nfds)))
    except VhostError:
        return
    assert m.request == req and len(body) == size


@settings(max_examples=2000, deadline=None)
@given(data=st.data())
def test_fuzz_mutated_valid_messages(data: st.DataObject) -> None:
    """Valid messages with random byte flips and truncations."""
    base = data.draw(st.sampled_from([
        P.encode_request(P.Request.SET_MEM_TABLE, P.mem_table(
            [P.MemRegion(0, 1 << 20, 1 << 40, 0), P.MemRegion(1 << 30, 1 << 20, 1 << 41, 0)])),
        P.encode_request(P.Request.SET_VRING_ADDR, P.vring_addr(P.VringAddr(0, 1, 2, 3, 4, 5))),
        P.encode_request(P.Request.SET_LOG_BASE, struct.pack("<QQ", 1 << 16, 0)),
        P.encode_request(P.Request.GET_CONFIG, struct.pack("<III", 0, 60, 0) + b"\0" * 60),
        P.encode_request(P.Request.SET_VRING_NUM, P.vring_state(0, 256)),
    ]))
    raw = bytearray(base)
    for _ in range(data.draw(st.integers(0, 6))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    raw = raw[:data.draw(st.integers(0, len(raw)))]
    nfds = data.draw(st.integers(0, 9))
    try:
        h = P.decode_header(bytes(raw[:P.HEADER_SIZE]))
        P.decode(h, bytes(raw[P.HEADER_SIZE:]), tuple(range(nfds)))
    except VhostError:
        pass
