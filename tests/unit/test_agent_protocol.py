"""The guest agent's wire format (hvtools.guest.protocol) and the client's stale-frame handling."""

from __future__ import annotations

import itertools
import os
import socket
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hvtools.errors import AgentError, HvTimeout, UsageError
from hvtools.guest.agent import AgentClient, wait_for_agent
from hvtools.guest.protocol import (
    HEADER_SIZE,
    MAGIC,
    MAX_PAYLOAD,
    ErrorReply,
    ExecRequest,
    ExitKind,
    ExitStatus,
    Frame,
    FrameDecoder,
    FrameType,
    ProtocolError,
    Rejected,
    decode_error,
    decode_exec,
    decode_exit,
    decode_pong,
    encode_error,
    encode_exec,
    encode_exit,
    encode_frame,
    encode_pong,
)


def raw_header(ftype: int, req_id: int, length: int, version: int = 1) -> bytes:
    """A header built by hand from the documented layout (not with the code under test)."""
    head = MAGIC + bytes([version, ftype]) + b"\0\0" + struct.pack("<II", req_id, length)
    return head + struct.pack("<I", zlib.crc32(head))


# -- frames -------------------------------------------------------------------------------------


def test_header_layout_matches_the_documented_bytes() -> None:
    frame = encode_frame(FrameType.EXEC, 0x01020304, b"xyz")
    assert frame[:4] == b"HVAG"
    assert frame[4] == 1 and frame[5] == 3 and frame[6:8] == b"\0\0"
    assert frame[8:12] == b"\x04\x03\x02\x01"
    assert frame[12:16] == b"\x03\0\0\0"
    assert frame[16:20] == struct.pack("<I", zlib.crc32(frame[:16]))
    assert frame[20:] == b"xyz"
    assert len(frame) == HEADER_SIZE + 3


@pytest.mark.parametrize("ftype", list(FrameType))
def test_round_trip_every_type(ftype: FrameType) -> None:
    payload = bytes(range(256)) * 3
    dec = FrameDecoder()
    assert dec.feed(encode_frame(ftype, 0xFFFFFFFF, payload)) == [
        Frame(ftype, 0xFFFFFFFF, payload)
    ]
    assert dec.buffered == 0 and dec.skipped == 0


def test_partial_frame_is_held_until_complete() -> None:
    data = encode_frame(FrameType.STDOUT, 7, b"hello") + encode_frame(FrameType.PING, 8)
    dec = FrameDecoder()
    got: list[Frame | Rejected] = []
    for i in range(len(data)):
        got += dec.feed(data[i : i + 1])
        if i < HEADER_SIZE + 5 - 1:
            assert got == []
    assert got == [Frame(FrameType.STDOUT, 7, b"hello"), Frame(FrameType.PING, 8)]
    assert dec.buffered == 0


def test_empty_payload_frame() -> None:
    assert FrameDecoder().feed(encode_frame(FrameType.PING, 1)) == [Frame(FrameType.PING, 1)]


def test_oversized_frame_is_rejected_and_its_payload_skipped() -> None:
    dec = FrameDecoder(max_payload=16)
    big = raw_header(FrameType.STDOUT, 5, 40) + b"HVAG" * 10  # payload even looks like magic
    ok = encode_frame(FrameType.PONG, 6, b"a=b\0")
    out = dec.feed(big[:30]) + dec.feed(big[30:] + ok)
    assert len(out) == 2
    rejected = out[0]
    assert isinstance(rejected, Rejected)
    assert (rejected.req_id, rejected.length) == (5, 40)
    assert "exceeds the limit of 16" in rejected.reason
    assert out[1] == Frame(FrameType.PONG, 6, b"a=b\0")


def test_default_limit_is_max_payload() -> None:
    out = FrameDecoder().feed(raw_header(FrameType.STDOUT, 1, MAX_PAYLOAD + 1))
    assert len(out) == 1 and isinstance(out[0], Rejected)
    assert FrameDecoder().feed(raw_header(FrameType.STDOUT, 1, MAX_PAYLOAD)) == []


def test_encoder_refuses_oversized_payloads_and_ids() -> None:
    with pytest.raises(ProtocolError, match="exceeds MAX_PAYLOAD"):
        encode_frame(FrameType.STDOUT, 1, bytes(MAX_PAYLOAD + 1))
    with pytest.raises(ProtocolError, match="u32"):
        encode_frame(FrameType.PING, 1 << 32)
    assert len(encode_frame(FrameType.STDOUT, 1, bytes(MAX_PAYLOAD))) == HEADER_SIZE + MAX_PAYLOAD


def test_unknown_type_and_version_are_rejected() -> None:
    dec = FrameDecoder()
    out = dec.feed(
        raw_header(99, 3, 2) + b"zz" + raw_header(1, 4, 1, version=2) + b"z"
        + encode_frame(FrameType.PING, 5)
    )
    assert [type(x) for x in out] == [Rejected, Rejected, Frame]
    assert isinstance(out[0], Rejected) and "unknown frame type 99" in out[0].reason
    assert isinstance(out[1], Rejected) and "version 2" in out[1].reason
    assert out[2] == Frame(FrameType.PING, 5)


def test_garbage_and_stale_fragments_are_skipped() -> None:
    frame = encode_frame(FrameType.STDERR, 9, b"payload")
    stale_tail = encode_frame(FrameType.STDOUT, 1, b"x" * 50)[33:]  # tail of an earlier frame
    dec = FrameDecoder()
    out = dec.feed(b"junk HVA H" + stale_tail + frame)
    assert out == [Frame(FrameType.STDERR, 9, b"payload")]
    assert dec.skipped == len(b"junk HVA H") + len(stale_tail)


def test_header_with_bad_crc_is_skipped() -> None:
    bad = bytearray(encode_frame(FrameType.STDOUT, 2, b"abc"))
    bad[9] ^= 0xFF
    good = encode_frame(FrameType.STDOUT, 3, b"def")
    dec = FrameDecoder()
    assert dec.feed(bytes(bad) + good) == [Frame(FrameType.STDOUT, 3, b"def")]
    assert dec.skipped == len(bad)


def test_split_magic_at_chunk_edge_is_kept() -> None:
    frame = encode_frame(FrameType.PING, 77)
    dec = FrameDecoder()
    assert dec.feed(b"xx" + frame[:3]) == []
    assert dec.buffered == 3
    assert dec.feed(frame[3:]) == [Frame(FrameType.PING, 77)]


def test_reset_forgets_partial_input() -> None:
    dec = FrameDecoder()
    dec.feed(encode_frame(FrameType.STDOUT, 1, b"abcdef")[:25])
    dec.reset()
    assert dec.buffered == 0
    assert dec.feed(encode_frame(FrameType.PING, 2)) == [Frame(FrameType.PING, 2)]


frames_st = st.lists(
    st.builds(
        Frame,
        st.sampled_from(list(FrameType)),
        st.integers(0, 0xFFFFFFFF),
        st.binary(max_size=300),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(frames=frames_st, cuts=st.lists(st.integers(0, 10_000), max_size=20),
       garbage=st.binary(max_size=64))
@example(frames=[], cuts=[], garbage=b"HVAG")  # a whole magic with no header after it
@example(frames=[], cuts=[], garbage=b"xxHV")
def test_any_split_of_a_stream_decodes_to_the_same_frames(
    frames: list[Frame], cuts: list[int], garbage: bytes
) -> None:
    stream = garbage + b"".join(encode_frame(f.type, f.req_id, f.payload) for f in frames)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    dec = FrameDecoder()
    out: list[Frame | Rejected] = []
    for a, b in itertools.pairwise(points):
        out += dec.feed(stream[a:b])
    assert out == frames
    # Only a header-to-be may stay buffered: a partial magic, or the magic and too few bytes
    # for the rest of the header.
    held = stream[len(stream) - dec.buffered:]
    assert dec.buffered < HEADER_SIZE
    assert MAGIC.startswith(held) or held.startswith(MAGIC)
    if frames:
        assert dec.buffered == 0
    assert dec.skipped + dec.buffered == len(garbage)


# -- payloads -----------------------------------------------------------------------------------


def test_exec_payload_layout_and_round_trip() -> None:
    req = ExecRequest(("sh", "-c", "cat; echo é"), b"in\0put", 1500)
    payload = encode_exec(req)
    assert payload[:16] == struct.pack("<IIII", 1500, 0, 3, 6)
    assert payload[16:] == b"sh\0-c\0cat; echo \xc3\xa9\0in\0put"
    assert decode_exec(payload) == req


@settings(max_examples=200, deadline=None)
@given(
    argv=st.lists(
        st.text(st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]),
                max_size=20),
        min_size=1,
        max_size=8,
    ),
    stdin=st.binary(max_size=200),
    timeout_ms=st.integers(0, 0xFFFFFFFF),
)
def test_exec_round_trip_property(argv: list[str], stdin: bytes, timeout_ms: int) -> None:
    req = ExecRequest(tuple(argv), stdin, timeout_ms)
    assert decode_exec(encode_exec(req)) == req


def test_exec_args_that_are_not_utf8_round_trip() -> None:
    arg = os.fsdecode(b"caf\xe9")
    req = ExecRequest(("ls", arg))
    assert encode_exec(req).endswith(b"caf\xe9\0")
    assert decode_exec(encode_exec(req)) == req


@pytest.mark.parametrize(
    ("req", "match"),
    [
        (ExecRequest(()), "argv is empty"),
        (ExecRequest(("\ud800",)), "cannot be encoded"),
        (ExecRequest(("a\0b",)), "NUL"),
        (ExecRequest(("cat",), bytes(MAX_PAYLOAD)), "exceeds MAX_PAYLOAD"),
        (ExecRequest(("x",) * 4097), "limit of 4096"),
        (ExecRequest(("x",), b"", 1 << 32), "u32"),
    ],
)
def test_exec_encoder_refuses_bad_requests(req: ExecRequest, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        encode_exec(req)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"\0" * 8, "shorter than its header"),
        (struct.pack("<IIII", 0, 0, 0, 0), "bad argc"),
        (struct.pack("<IIII", 0, 0, 1, 99) + b"a\0", "stdin length"),
        (struct.pack("<IIII", 0, 0, 2, 0) + b"a\0", "exactly 2"),
        (struct.pack("<IIII", 0, 0, 1, 0) + b"abc", "exactly 1"),
    ],
)
def test_exec_decoder_refuses_malformed_payloads(payload: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_exec(payload)


def test_exit_round_trip_and_layout() -> None:
    st_ = ExitStatus(137, ExitKind.TIMEOUT, 9, 1_000_000_123)
    payload = encode_exit(st_)
    assert payload == struct.pack("<iBBHQ", 137, 2, 9, 0, 1_000_000_123)
    assert decode_exit(payload) == st_
    with pytest.raises(ProtocolError, match="expected 16"):
        decode_exit(payload[:-1])
    with pytest.raises(ProtocolError, match="exit kind 7"):
        decode_exit(struct.pack("<iBBHQ", 0, 7, 0, 0, 0))


def test_error_round_trip() -> None:
    err = ErrorReply(127, 2, "nope: command not found")
    assert decode_error(encode_error(err)) == err
    assert decode_error(struct.pack("<ii", -1, 90)) == ErrorReply(-1, 90, "")
    with pytest.raises(ProtocolError):
        decode_error(b"\0")


def test_pong_round_trip() -> None:
    info = {"release": "6.1.0-56-cloud-amd64", "uptime_ms": "1234", "empty": ""}
    payload = encode_pong(info)
    assert payload == b"release=6.1.0-56-cloud-amd64\0uptime_ms=1234\0empty=\0"
    assert decode_pong(payload) == info
    assert decode_pong(b"") == {}
    with pytest.raises(ProtocolError, match="NUL-terminated"):
        decode_pong(b"a=b")
    with pytest.raises(ProtocolError, match="no '='"):
        decode_pong(b"ab\0")


# -- the client against a scripted peer ---------------------------------------------------------


class ScriptedAgent:
    """A UNIX-socket peer that answers each request with frames from ``script``."""

    def __init__(
        self, path: Path, script: Callable[[Frame], bytes], connections: int = 1
    ) -> None:
        self.path = path
        self.seen: list[Frame] = []
        self._script = script
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(str(path))
        self._srv.listen(4)
        self._thread = threading.Thread(target=self._serve, args=(connections,), daemon=True)
        self._thread.start()

    def _serve(self, connections: int) -> None:
        for _ in range(connections):
            conn, _ = self._srv.accept()
            dec = FrameDecoder()
            with conn:
                open_ = True
                while open_ and (data := conn.recv(65536)):
                    for item in dec.feed(data):
                        assert isinstance(item, Frame)
                        self.seen.append(item)
                        reply = self._script(item)
                        if reply == b"CLOSE":
                            open_ = False
                            break
                        conn.sendall(reply)

    def close(self) -> None:
        self._srv.close()
        self._thread.join(5)


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "agent.sock"


def pong(req_id: int) -> bytes:
    return encode_frame(FrameType.PONG, req_id, encode_pong({"release": "r", "uptime_ms": "1500"}))


def test_client_drops_stale_frames_before_its_pong(sock_path: Path) -> None:
    def script(f: Frame) -> bytes:
        if f.type is FrameType.PING:
            stale = encode_frame(FrameType.STDOUT, f.req_id ^ 1, b"old output")
            partial = encode_frame(FrameType.STDOUT, 3, b"x" * 40)[25:]
            return partial + stale + pong(f.req_id ^ 1) + pong(f.req_id)
        req = decode_exec(f.payload)
        return (
            encode_frame(FrameType.STDOUT, f.req_id ^ 1, b"not mine")
            + encode_frame(FrameType.STDOUT, f.req_id, b"".join(a.encode() for a in req.argv))
            + encode_frame(FrameType.STDERR, f.req_id, req.stdin)
            + encode_frame(FrameType.EXIT, f.req_id, encode_exit(ExitStatus(3, ExitKind.EXITED,
                                                                            0, 2_500_000_000)))
        )

    peer = ScriptedAgent(sock_path, script)
    with AgentClient(sock_path) as client:
        client.connect(timeout=5)
        info = client.ping()
        assert info["release"] == "r" and info["uptime_s"] == 1.5
        result = client.exec(["a", "b"], stdin=b"to stderr", timeout=2.5)
    peer.close()
    assert (result.argv, result.status, result.stdout, result.stderr) == (
        ("a", "b"), 3, b"ab", b"to stderr"
    )
    assert result.duration_s == 2.5 and not result.timed_out and not result.ok
    exec_frame = peer.seen[-1]
    assert decode_exec(exec_frame.payload) == ExecRequest(("a", "b"), b"to stderr", 2500)
    assert [f.type for f in peer.seen] == [FrameType.PING, FrameType.PING, FrameType.EXEC]


def test_client_maps_exec_failure_and_refusal(sock_path: Path) -> None:
    def script(f: Frame) -> bytes:
        if f.type is FrameType.PING:
            return pong(f.req_id)
        argv = decode_exec(f.payload).argv
        if argv[0] == "missing":
            return encode_frame(FrameType.ERROR, f.req_id,
                                encode_error(ErrorReply(127, 2, "missing: command not found")))
        if argv[0] == "timeout":
            return encode_frame(FrameType.EXIT, f.req_id,
                                encode_exit(ExitStatus(137, ExitKind.TIMEOUT, 9, 10**9)))
        return encode_frame(FrameType.ERROR, f.req_id, encode_error(ErrorReply(-1, 16, "busy")))

    peer = ScriptedAgent(sock_path, script)
    with AgentClient(sock_path) as client:
        client.connect()
        missing = client.exec(["missing"])
        assert missing.status == 127 and b"command not found" in missing.stderr
        timed = client.exec(["timeout"], timeout=1)
        assert timed.timed_out and timed.status == 137
        with pytest.raises(AgentError, match="timed out"):
            timed.check()
        with pytest.raises(AgentError, match=r"refused .*busy"):
            client.exec(["other"])
        with pytest.raises(UsageError):
            client.exec("not a list")
        with pytest.raises(UsageError):
            client.exec([])
    peer.close()


def test_client_reports_a_closed_connection(sock_path: Path) -> None:
    peer = ScriptedAgent(
        sock_path, lambda f: pong(f.req_id) if f.type is FrameType.PING else b"CLOSE"
    )
    client = AgentClient(sock_path)
    client.connect()
    with pytest.raises(AgentError, match="closed"):
        client.exec(["x"], timeout=5)
    assert not client.connected
    peer.close()


def test_wait_for_agent_times_out_and_stops_when_the_vm_dies(sock_path: Path) -> None:
    with pytest.raises(HvTimeout, match=r"did not answer within 0\.3 s"):
        wait_for_agent(sock_path, timeout=0.3)
    silent = ScriptedAgent(sock_path, lambda f: b"")
    calls = []

    def alive() -> bool:
        calls.append(1)
        return len(calls) < 5

    with pytest.raises(AgentError, match="VM stopped"):
        wait_for_agent(sock_path, timeout=30, alive=alive, poll=0.01)
    silent.close()


def test_wait_for_agent_retries_until_the_socket_appears(sock_path: Path) -> None:
    peer: list[ScriptedAgent] = []
    timer = threading.Timer(
        0.3, lambda: peer.append(ScriptedAgent(sock_path, lambda f: pong(f.req_id)))
    )
    timer.start()
    client = wait_for_agent(sock_path, timeout=10, poll=0.02)
    assert client.connected
    client.close()
    timer.join()
    peer[0].close()


def test_poweroff_returns_when_the_peer_goes_away(sock_path: Path) -> None:
    def script(f: Frame) -> bytes:
        if f.type is FrameType.PING:
            return pong(f.req_id)
        assert decode_exec(f.payload).argv == ("poweroff", "-f")
        return b"CLOSE"

    peer = ScriptedAgent(sock_path, script)
    client = AgentClient(sock_path)
    client.connect()
    client.poweroff(timeout=5)
    assert not client.connected
    peer.close()


def test_poweroff_reports_a_failed_command(sock_path: Path) -> None:
    def script(f: Frame) -> bytes:
        if f.type is FrameType.PING:
            return pong(f.req_id)
        return encode_frame(FrameType.ERROR, f.req_id,
                            encode_error(ErrorReply(127, 2, "poweroff: command not found")))

    peer = ScriptedAgent(sock_path, script)
    with AgentClient(sock_path) as client:
        client.connect()
        with pytest.raises(AgentError, match="poweroff: command not found"):
            client.poweroff(timeout=5)
    peer.close()
