"""Live fuzzing of a real edge process over real sockets, against a real Valkey.

Many connections at once (each a raw socket: our own handshake and framing, so that
anything can be sent) get mutated valid requests (fields dropped, replaced by any JSON
value, added; bytes flipped, inserted, cut), random bytes and text, non-standard JSON,
both codecs, fragmented messages, client pings, and, now and then, a frame that ends the
connection: broken framing (reserved opcodes and bits, an unmasked frame, bad close
frames, oversized or fragmented control frames, continuations of nothing), an oversized
frame with more frames behind it, a text frame that is not UTF-8. Meanwhile a publisher
publishes to a channel a bystander client reads, and to channels the fuzzed connections
subscribe to (live traffic and replays mixed into the fuzz).

Checked, whatever was sent:

- every server frame is a well-formed, unmasked frame; every data frame decodes to a
  message object (or an array of them) of a documented type; every `error` carries a
  documented code; every close code is documented (1002, 1009, 3500, 3007, ...), and a
  connection the edge ends always gets its close frame;
- no exception text reaches a client (tracebacks, source locations, exception names);
- no crash: the edge neither exits nor closes anyone with 3004, and its log has no
  traceback and no ERROR line;
- the bystander misses nothing: its offsets are contiguous up to the last one published;
- the edge's RSS stays bounded.

    .venv/bin/python -m tests.support.fuzz_live --frames 1000000   # what `make fuzz` runs
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
from redis.asyncio import Redis

from common.broker.keys import Keys
from common.broker.redisbroker import RedisBroker
from common.config import HistoryPolicy
from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from tests.support.edgeproc import EdgeProcess, edge_process
from tests.support.fuzzing import CLOSE_CODES, ERROR_CODES, SERVER_TYPES, exception_text
from tests.support.wsclient import ProtoClient

HOST = "127.0.0.1"
BYSTANDER = "account.BYSTANDER.orders"  # "all" delivery: a miss would be a gap or a 3001
BUSY = "trades.FUZZBUSY"  # published to all along; fuzzed connections subscribe to it
MAX_MESSAGE = 65_536  # the edge's max_message_size (default)
CHANNELS = [BUSY, BYSTANDER, "quotes.FZ", "depth.FZ", "bars.1m.FZ", "account.F1.balance",
            "trades.FZ1", "quotes.CON.F.US.MNQ.Z25", *(f"quotes.Z{i}" for i in range(24))]
BAD_CHANNELS = ["", "quotes", "quotes.", "nope.X", "quotes.A B", "account.1.secrets",
                "bars.1x.ES", "trades." + "X" * 130, "quotes.É", "quotes.\u0000"]
BAD_JSON = [
    b"", b"{", b"}", b"[", b'{"type":"ping"', b'{"type":"ping"}}', b"NaN", b"Infinity",
    b'{"type":"ping","id":NaN}', b'{"type":"subscribe","channel":"quotes.FZ","max_rate":-Infinity}',
    b'{"type":"ping","x":"\\ud800"}', b'{"\\udc00":1,"type":"ping"}', b"[" * 3000 + b"]" * 3000,
    b'{"a":' * 2000 + b"1" + b"}" * 2000, b"1" * 5000, b"\xef\xbb\xbf{}", b"nul", b"tru",
    b'{"type":"ping"} x', b'"\\u0000"', b"-", b"1e99999", b"[1,]", b'{"a":1,}',
    b'{"type":"ping"}'.decode().encode("utf-16"), b"\x00\x00\x00{",
]
# Frames that end the connection, and how the edge must close it.
TERMINAL = {
    "reserved_opcode": {1002}, "rsv_bits": {1002}, "unmasked": {1002}, "long_ping": {1002},
    "fragmented_ping": {1002}, "lone_continuation": {1002}, "bad_close_code": {1002},
    "close_1_byte": {1002}, "close_bad_utf8": {1002}, "oversized": {1009},
    "oversized_then_more": {1009}, "text_not_utf8": {3500}, "garbage": {3500},
    "text_on_msgpack": {3500}, "new_message_mid_fragment": {1002},
}


# --- what is sent ----------------------------------------------------------------------------


class Mutator:
    """Client frames (payloads and framing), from one seeded RNG: reproducible."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    # values

    def string(self, long: bool = False) -> str:
        rng = self.rng
        n = rng.choice((0, 1, 3, 8, 20, 64)) if not long else rng.randint(1_000, 70_000)
        kind = rng.random()
        if kind < 0.5:
            return "".join(rng.choice("abcXYZ019 ._:-*\"\\/\n\t{}[],") for _ in range(n))
        if kind < 0.8:
            return "".join(chr(rng.choice((rng.randint(0x20, 0x7E), rng.randint(0xA0, 0x2FFF),
                                           rng.randint(0x1F300, 0x1F6FF), 0, 0x7F, 0xFEFF)))
                           for _ in range(n))
        if kind < 0.98:
            return "x" * n
        return "".join(chr(rng.randint(0, 0x10FFFF)) for _ in range(n))  # surrogates too

    def value(self, depth: int = 0) -> Any:
        rng = self.rng
        r = rng.random()
        if depth > 3 or r < 0.55:
            return rng.choice((
                None, True, False, 0, -1, 1, 7, 2**31, 2**53 - 1, 2**53, 2**63, 2**64,
                -(2**63) - 1, 10**30, rng.randint(-(10**6), 10**6), 0.5, -0.0, 1e308, 5e-324,
                rng.random() * 2000 - 500, "", "e1", "quotes.FZ", self.string(),
                "x" * 70, [], {},
            ))
        if r < 0.75:
            return [self.value(depth + 1) for _ in range(rng.randint(0, 4))]
        return {self.string(): self.value(depth + 1) for _ in range(rng.randint(0, 4))}

    # requests

    def channel(self) -> str:
        r = self.rng.random()
        if r < 0.8:
            return self.rng.choice(CHANNELS)
        if r < 0.9:
            return self.rng.choice(BAD_CHANNELS)
        return self.string()

    def request(self, epoch: str) -> dict[str, Any]:
        rng = self.rng
        kind = rng.choice(("subscribe", "subscribe", "subscribe", "unsubscribe", "unsubscribe",
                           "history", "ping", "ping", "pong", "refresh", "connect"))
        req: dict[str, Any] = {"type": kind}
        if rng.random() < 0.9:
            req["id"] = rng.randint(0, 2**53 - 1) if rng.random() < 0.9 else self.value()
        if kind in ("subscribe", "unsubscribe", "history"):
            req["channel"] = self.channel()
        if kind == "subscribe":
            if rng.random() < 0.4:
                req["snapshot"] = rng.random() < 0.5
            if rng.random() < 0.4:
                req["recover"] = {"offset": rng.choice((0, 1, 5, 50, 500, 5_000, 10**6)),
                                  "epoch": epoch if rng.random() < 0.7 else "e0"}
            if rng.random() < 0.2:
                req["max_rate"] = rng.choice((0.5, 1, 10, 1000, 1001, 0, -1))
        elif kind == "history":
            first = rng.choice((1, 2, 10, 100, 1000))
            req.update({"epoch": epoch, "from": first, "to": first + rng.choice((0, 5, 200))})
        elif kind in ("refresh", "connect"):
            req["token"] = rng.choice(("", "a.b.c", "x" * 9000, None, self.string()))
        return req

    def mutate(self, obj: dict[str, Any]) -> dict[str, Any]:
        rng = self.rng
        obj = dict(obj)
        for _ in range(rng.choice((1, 1, 2, 3))):
            r = rng.random()
            keys = list(obj)
            if r < 0.3 and keys:
                del obj[rng.choice(keys)]
            elif r < 0.75 and keys:
                obj[rng.choice(keys)] = self.value()
            else:
                obj[self.string() if rng.random() < 0.5 else rng.choice(("type", "id"))] = \
                    self.value()
        return obj

    # encodings

    def encode(self, obj: Any, codec: str) -> tuple[int, bytes]:
        """(opcode, payload) of a message on `codec` ("json" or "msgpack")."""
        rng = self.rng
        if codec == "msgpack":
            try:
                return 0x2, msgpack.packb(obj, use_bin_type=True)
            except (OverflowError, UnicodeEncodeError, ValueError):
                return 0x2, msgpack.packb({"type": "ping", "id": 1})
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=rng.random() < 0.5)
        data = text.encode("utf-8", "surrogatepass")  # a lone surrogate: not UTF-8
        return (0x2 if rng.random() < 0.1 else 0x1), data

    def flip(self, data: bytes) -> bytes:
        rng = self.rng
        if not data:
            return bytes((rng.randint(0, 255),))
        b = bytearray(data)
        r = rng.random()
        i = rng.randrange(len(b))
        if r < 0.4:
            b[i] = rng.randint(0, 255)
        elif r < 0.6:
            b[i:i] = rng.randbytes(rng.randint(1, 8))
        elif r < 0.8:
            del b[i:i + rng.randint(1, 8)]
        else:
            b = b[:i]
        return bytes(b)

    def payload(self, codec: str, epoch: str) -> tuple[int, bytes]:
        """One data frame: mostly a request, valid or with mutated fields (an error reply
        at most); a few percent are undecodable (flipped bytes, a value that is not an
        object, broken JSON, random bytes) and end the connection with 3500, so that a
        connection lives for some dozens of requests."""
        rng = self.rng
        r = rng.random()
        if r < 0.5:
            return self.encode(self.request(epoch), codec)
        if r < 0.96:
            return self.encode(self.mutate(self.request(epoch)), codec)
        if r < 0.98:
            opcode, data = self.encode(self.request(epoch), codec)
            return opcode, self.flip(data)
        if r < 0.99:
            return self.encode(self.value(), codec)
        if r < 0.995:
            return (0x2 if codec == "msgpack" else 0x1), rng.choice(BAD_JSON)
        return rng.choice((0x1, 0x2)), rng.randbytes(rng.randint(0, 40))


def frame(first: int, payload: bytes, masked: bool = True, key: bytes = b"\0\0\0\0",
          length: int | None = None) -> bytes:
    """A client frame; `length` overrides the declared payload length."""
    n = len(payload) if length is None else length
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((first, mask_bit | n))
    elif n < 0x10000:
        head = bytes((first, mask_bit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, mask_bit | 127)) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    if key != b"\0\0\0\0":
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + payload


def terminal(rng: random.Random, codec: str) -> tuple[str, bytes]:
    """A frame (or frames) that must end the connection, and its kind."""
    kind = rng.choice(sorted(TERMINAL))
    if kind == "text_on_msgpack" and codec != "msgpack":
        kind = "garbage"
    if kind == "reserved_opcode":
        data = frame(0x80 | rng.choice((3, 4, 5, 6, 7, 11, 12, 13, 14, 15)), b"{}")
    elif kind == "rsv_bits":
        data = frame(rng.choice((0x40, 0x20, 0x10)) | 0x81, b'{"type":"ping"}')
    elif kind == "unmasked":
        data = frame(0x81, b'{"type":"ping"}', masked=False)
    elif kind == "long_ping":
        data = frame(0x89, b"p" * rng.randint(126, 300))
    elif kind == "fragmented_ping":
        data = frame(0x09, b"p")
    elif kind == "lone_continuation":
        data = frame(0x80, b'{"type":"ping"}')
    elif kind == "bad_close_code":
        code = rng.choice((0, 999, 1004, 1005, 1006, 1015, 1100, 2999, 5000, 65535))
        data = frame(0x88, code.to_bytes(2, "big") + b"bye")
    elif kind == "close_1_byte":
        data = frame(0x88, b"\x03")
    elif kind == "close_bad_utf8":
        data = frame(0x88, (1000).to_bytes(2, "big") + b"\xff\xfe")
    elif kind in ("oversized", "oversized_then_more"):
        size = rng.choice((MAX_MESSAGE + 1, 70_000, 300_000, 1_000_000))
        data = frame(0x81, b'{"type":"ping","x":"' + b"x" * (size - 20) + b'"}')
        if kind == "oversized_then_more":
            data += b"".join(frame(0x81, b'{"type":"ping"}') for _ in range(rng.randint(1, 30)))
    elif kind == "text_not_utf8":
        data = frame(0x81, b'{"type":"ping","x":"' + rng.choice(
            (b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xe2\x82")) + b'"}')
    elif kind == "new_message_mid_fragment":
        data = frame(0x01, b'{"type":') + frame(0x81, b'{"type":"ping"}')
    elif kind == "text_on_msgpack":
        data = frame(0x81, b'{"type":"ping"}')
    else:  # garbage: not JSON, not msgpack
        data = frame(0x82 if codec == "msgpack" else 0x81,
                     b"\xc1" if codec == "msgpack" else rng.choice(BAD_JSON[:12]))
    return kind, data


# --- what comes back ---------------------------------------------------------------------------


@dataclass
class Report:
    frames_target: int
    seed: int
    frames_sent: int = 0
    bytes_sent: int = 0
    connections: int = 0
    messages_received: int = 0
    frames_read: int = 0  # the edge's fanout_edge_frames_received_total
    held: dict[str, int] = field(default_factory=dict)  # what the edge holds at the end
    close_codes: collections.Counter[int | str] = field(default_factory=collections.Counter)
    error_codes: collections.Counter[str] = field(default_factory=collections.Counter)
    terminals: collections.Counter[str] = field(default_factory=collections.Counter)
    crashes: list[str] = field(default_factory=list)
    exception_texts: list[str] = field(default_factory=list)
    undocumented: list[str] = field(default_factory=list)
    lost_closes: list[str] = field(default_factory=list)
    bystander: str = ""
    bystander_ok: bool = False
    published: int = 0
    rss_start: int = 0  # KiB, edge ready
    rss_before: int = 0  # KiB, after the warm-up
    rss_after: int = 0
    rss_max: int = 0
    rss_limit: int = 0  # KiB the RSS may grow past rss_before
    log_problems: list[str] = field(default_factory=list)
    log_warnings: int = 0
    seconds: float = 0.0

    def problem(self, where: list[str], text: str) -> None:
        if len(where) < 20:
            where.append(text[:300])
        else:
            where[-1] = f"... ({text[:100]})"

    def text(self) -> str:
        mib = 1024
        lines = [
            f"live fuzz: seed {self.seed}, {self.seconds:.1f} s",
            f"frames sent:       {self.frames_sent:,} ({self.bytes_sent / 1e6:,.1f} MB), "
            f"target {self.frames_target:,}",
            f"connections:       {self.connections:,}",
            f"messages the edge's sessions read: {self.frames_read:,} (the rest: control "
            "frames, fragments, frames after a close)",
            f"messages received: {self.messages_received:,}",
            f"close codes:       {dict(sorted(self.close_codes.items(), key=str))}",
            f"error codes:       {dict(sorted(self.error_codes.items()))}",
            f"terminal frames:   {dict(sorted(self.terminals.items()))}",
            f"crashes:           {len(self.crashes)} {self.crashes[:5]}",
            f"exception texts:   {len(self.exception_texts)} {self.exception_texts[:5]}",
            f"undocumented:      {len(self.undocumented)} {self.undocumented[:5]}",
            f"lost close frames: {len(self.lost_closes)} {self.lost_closes[:5]}",
            f"bystander:         {self.bystander}",
            f"left on the edge:  {self.held} (the bystander's: 1 of each)",
            f"edge RSS:          start {self.rss_start / mib:.1f} MiB, before "
            f"(after warm-up) {self.rss_before / mib:.1f} MiB, after "
            f"{self.rss_after / mib:.1f} MiB, max {self.rss_max / mib:.1f} MiB "
            f"(limit: before + {self.rss_limit / mib:.0f} MiB)",
            f"edge log:          {len(self.log_problems)} tracebacks/errors "
            f"{self.log_problems[:3]}, {self.log_warnings} warnings",
        ]
        return "\n".join(lines)

    @property
    def failures(self) -> list[str]:
        out = []
        if self.crashes:
            out.append("crashes")
        if self.exception_texts:
            out.append("exception text reached a client")
        if self.undocumented:
            out.append("undocumented answers")
        if self.lost_closes:
            out.append("close frames lost")
        if not self.bystander_ok:
            out.append("the bystander missed something")
        if any(v != 1 for v in self.held.values()):
            out.append("the edge holds connections, subscriptions or channels of ended clients")
        if self.log_problems:
            out.append("tracebacks or errors in the edge log")
        if self.rss_max - self.rss_before > self.rss_limit:
            out.append("edge RSS grew past its limit")
        if self.frames_sent < self.frames_target:
            out.append("fewer frames sent than asked")
        return out

    def check(self) -> None:
        assert not self.failures, f"{', '.join(self.failures)}\n{self.text()}"


class Connection:
    """One fuzzed connection: a raw socket, our framing, a reader checking every frame."""

    def __init__(self, report: Report, rng: random.Random) -> None:
        self.report = report
        self.rng = rng
        self.codec = "json"
        self.close: tuple[int, str] | None = None
        self.lost = False
        self.epoch = "e0"
        self.terminal: str | None = None  # the connection-ending frame sent, if any
        self.writer: asyncio.StreamWriter | None = None

    async def run(self, port: int, budget: int, fuzzer: Fuzzer) -> None:
        rng = self.rng
        report = self.report
        reader, writer = await asyncio.open_connection(HOST, port)
        report.connections += 1
        try:
            offered = rng.choice((["fanout.json"], ["fanout.msgpack"], [],
                                  ["fanout.json", "fanout.msgpack"], ["other"]))
            key = base64.b64encode(rng.randbytes(16)).decode()
            head = (f"GET /ws HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
                    f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                    "Sec-WebSocket-Version: 13\r\n")
            if offered:
                head += f"Sec-WebSocket-Protocol: {', '.join(offered)}\r\n"
            writer.write((head + "\r\n").encode())
            response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            if not response.startswith(b"HTTP/1.1 101"):
                report.problem(report.undocumented, f"handshake: {response[:100]!r}")
                return
            if b"fanout.msgpack" in response:
                self.codec = "msgpack"
            self.writer = writer
            reading = asyncio.create_task(self.read(reader, writer))
            try:
                await self.send(writer, budget, fuzzer)
            finally:
                try:
                    await asyncio.wait_for(asyncio.shield(reading), 15)
                except TimeoutError:
                    reading.cancel()
                    report.problem(report.undocumented, "the edge did not close in 15 s")
            if self.terminal is not None and self.close is None:
                report.problem(report.lost_closes, f"after {self.terminal}: no close frame")
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            writer.transport.abort()

    async def send(self, writer: asyncio.StreamWriter, budget: int, fuzzer: Fuzzer) -> None:
        rng = self.rng
        report = self.report
        mutator = Mutator(rng)
        codec = self.codec
        if rng.random() < 0.92:
            connect = {"type": "connect", "id": 1, "name": "fuzz"}
            opcode, data = mutator.encode(connect, codec)
            if opcode == 0x1 and codec == "msgpack":
                opcode = 0x2
        else:
            opcode, data = mutator.payload(codec, self.epoch)
        out = [frame(0x80 | opcode, data)]
        sent = 1
        ending = rng.random()
        while sent < budget and not fuzzer.done():
            if self.close is not None or self.lost:
                break
            r = rng.random()
            if r < 0.004:
                kind, data = terminal(rng, codec)
                report.terminals[kind] += 1
                self.terminal = kind
                out.append(data)
                sent += 1
                break
            if r < 0.02:  # a message in two or three fragments
                op, payload = mutator.payload(codec, self.epoch)
                cut = rng.randint(0, len(payload))
                parts = [payload[:cut], payload[cut:]]
                out.append(frame(op, parts[0]))
                if rng.random() < 0.3:  # a control frame in the middle is allowed
                    out.append(frame(0x89, b"mid"))
                out.append(frame(0x80, parts[1]))
            elif r < 0.03:
                out.append(frame(0x89, rng.randbytes(rng.randint(0, 125))))  # client ping
            elif r < 0.035:
                out.append(frame(0x8A, b"unsolicited pong"))
            else:
                op, payload = mutator.payload(codec, self.epoch)
                key = b"\0\0\0\0" if rng.random() < 0.9 else rng.randbytes(4)
                out.append(frame(0x80 | op, payload, key=key))
            sent += 1
            if len(out) >= 8:
                await self.flush(writer, out)
                out = []
                await asyncio.sleep(0)  # the reader's turn: stop soon after a close
        report.frames_sent += sent
        fuzzer.sent += sent
        if self.close is None and not self.lost and self.terminal is None:
            if ending < 0.6:  # close properly
                out.append(frame(0x88, (1000).to_bytes(2, "big") + b"done"))
            elif ending < 0.8 and writer.can_write_eof():
                await self.flush(writer, out)
                out = []
                with contextlib.suppress(OSError):
                    writer.write_eof()
            else:
                await self.flush(writer, out)
                writer.transport.abort()  # just gone
                self.lost = True
                return
        await self.flush(writer, out)

    async def flush(self, writer: asyncio.StreamWriter, out: list[bytes]) -> None:
        if not out or writer.transport.is_closing():
            return
        data = b"".join(out)
        self.report.bytes_sent += len(data)
        try:
            writer.write(data)
            await writer.drain()
        except (ConnectionError, OSError):
            self.lost = True

    async def read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        report = self.report
        try:
            while True:
                b0, b1 = await reader.readexactly(2)
                opcode, n = b0 & 0x0F, b1 & 0x7F
                if b1 & 0x80 or b0 & 0x70 or not b0 & 0x80:
                    report.problem(report.undocumented, f"server frame header {b0:#x} {b1:#x}")
                if n == 126:
                    n = int.from_bytes(await reader.readexactly(2), "big")
                elif n == 127:
                    n = int.from_bytes(await reader.readexactly(8), "big")
                payload = await reader.readexactly(n)
                if opcode in (0x1, 0x2):
                    self.messages(opcode, payload)
                elif opcode == 0x8:
                    code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                    reason = payload[2:].decode("utf-8", "replace")
                    self.close = (code, reason)
                    report.close_codes[code] += 1
                    if code not in CLOSE_CODES and code != 1000:
                        target = report.crashes if code in (3004, 1011) else report.undocumented
                        report.problem(target, f"close {code} {reason!r}")
                    if (found := exception_text(reason)) is not None:
                        report.problem(report.exception_texts, f"close reason {reason!r}: {found}")
                    return
                elif opcode not in (0x9, 0xA):
                    report.problem(report.undocumented, f"server opcode {opcode:#x}")
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            self.lost = True
            report.close_codes["none (TCP closed)"] += 1

    def messages(self, opcode: int, payload: bytes) -> None:
        report = self.report
        try:
            if self.codec == "msgpack":
                value = msgpack.unpackb(payload, raw=False)
            else:
                value = json.loads(payload.decode("utf-8"))
        except ValueError as exc:
            report.problem(report.undocumented, f"undecodable server frame {exc}")
            return
        items = value if isinstance(value, list) else [value]
        for msg in items:
            report.messages_received += 1
            if not isinstance(msg, dict) or msg.get("type") not in SERVER_TYPES:
                report.problem(report.undocumented, f"message {str(msg)[:200]}")
                continue
            kind = msg["type"]
            if kind == "error":
                code = msg.get("code")
                report.error_codes[str(code)] += 1
                target = report.crashes if code == "internal" else report.undocumented
                if code not in ERROR_CODES:
                    report.problem(target, f"error {msg}")
            elif kind == "subscribed" and isinstance(msg.get("epoch"), str):
                self.epoch = msg["epoch"]
            elif kind == "ping" and self.writer is not None:  # the edge's heartbeat
                with contextlib.suppress(OSError, RuntimeError):
                    _op, data = Mutator(self.rng).encode({"type": "pong"}, self.codec)
                    self.writer.write(frame(0x80 | (0x2 if self.codec == "msgpack" else 0x1),
                                            data))
            if kind != "pub":
                found = exception_text(json.dumps(msg, default=repr))
                if found is not None:
                    report.problem(report.exception_texts, f"{found}: {str(msg)[:200]}")


def save(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


async def gauges(edge: EdgeProcess, *names: str) -> dict[str, int]:
    """The edge's `fanout_edge_<name>` samples (unlabelled), from its /metrics."""
    text = await edge.metrics()
    out = dict.fromkeys(names, -1)
    for line in text.splitlines():
        for name in names:
            if line.startswith(f"fanout_edge_{name} "):
                out[name] = int(float(line.split()[1]))
    return out


async def left_behind(edge: EdgeProcess) -> dict[str, int]:
    """Connections, subscriptions and channels the edge still holds once every fuzzed
    connection has ended: the bystander's only (1, 1, 1), or something leaked. Waits a
    little for connections still closing."""
    names = ("connections", "subscriptions", "channels")
    deadline = time.monotonic() + 15
    while True:
        now = await gauges(edge, *names)
        if now == dict.fromkeys(names, 1) or time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.2)


class Fuzzer:
    def __init__(self, target: int) -> None:
        self.target = target
        self.sent = 0

    def done(self) -> bool:
        return self.sent >= self.target


async def run_live_fuzz(
    redis_url: str, key_prefix: str, *, frames: int, seed: int = 1, concurrency: int = 16,
    rss_limit_mib: float = 64.0, progress: bool = False,
) -> Report:
    """Start an edge process and fuzz it with `frames` frames; the report says what was
    seen (`Report.check` raises if anything was wrong)."""
    report = Report(frames, seed, rss_limit=int(rss_limit_mib * 1024))
    started = time.monotonic()
    env = {"FANOUT_LOG_LEVEL": "info"}
    if os.environ.get("FANOUT_FUZZ_EDGE_GC"):  # e.g. "700,10,10": the edge's collector
        env["FANOUT_GC_THRESHOLDS"] = os.environ["FANOUT_FUZZ_EDGE_GC"]
    async with edge_process(redis_url, key_prefix, pin=False, **env) as edge:
        report.rss_start = report.rss_max = edge.rss_kib()
        redis = Redis.from_url(redis_url, decode_responses=True)
        publisher = Publisher(RedisBroker(redis, Keys(key_prefix)))
        publisher.history["account"] = HistoryPolicy(100_000, 3_600.0)
        try:
            await _fuzz(edge, publisher, report, frames, seed, concurrency, progress)
        finally:
            await redis.aclose()
        log = edge.log()
        if os.environ.get("FANOUT_FUZZ_LOG"):  # keep the edge's log there
            save(os.environ["FANOUT_FUZZ_LOG"], log)
        for line in log.splitlines():
            if "Traceback" in line or " ERROR " in line or "session error" in line:
                report.problem(report.log_problems, line)
            elif " WARNING " in line and "authentication is off" not in line:
                report.log_warnings += 1
        if not edge.alive:
            report.problem(report.crashes, f"the edge exited: {edge.proc.returncode}")
    report.seconds = time.monotonic() - started
    return report


async def _fuzz(edge: EdgeProcess, publisher: Publisher, report: Report, frames: int,
                seed: int, concurrency: int, progress: bool) -> None:
    stop = asyncio.Event()
    last = {BYSTANDER: 0}

    async def publish() -> None:
        i = 0
        while not stop.is_set():
            results = await publisher.publish_batch([
                UpstreamMessage(BYSTANDER, {"i": i}, key=f"o{i % 50}"),
                UpstreamMessage(BUSY, {"price": 100 + i % 13, "size": 1 + i % 4}),
                UpstreamMessage(CHANNELS[8 + i % 24], {"bid": i}),
            ])
            last[BYSTANDER] = results[0].offset
            report.published += 1
            i += 1
            await asyncio.sleep(0.005)

    bystander = await ProtoClient.open(edge.url)
    await bystander.subscribe(BYSTANDER)
    publishing = asyncio.create_task(publish())
    fuzzer = Fuzzer(frames)
    warmup = min(frames // 20, 20_000)
    sampled = asyncio.Event()

    next_progress = time.monotonic() + 10

    async def sample_rss() -> None:
        nonlocal next_progress
        while not stop.is_set():
            with contextlib.suppress(OSError, RuntimeError):
                rss = edge.rss_kib()
                report.rss_max = max(report.rss_max, rss)
                if not sampled.is_set() and fuzzer.sent >= warmup:
                    report.rss_before = rss
                    report.rss_max = rss
                    sampled.set()
            if progress and time.monotonic() >= next_progress:
                next_progress += 10
                print(f"  {fuzzer.sent:,} frames, {report.connections:,} connections, edge RSS "
                      f"{report.rss_max / 1024:.1f} MiB", file=sys.stderr, flush=True)
            await asyncio.sleep(0.25)

    async def worker(n: int) -> None:
        rng = random.Random(seed * 1_000 + n)
        while not fuzzer.done() and edge.alive:
            budget = rng.choice((1, 2, 5, 20, 100, 400, 1_200))
            await Connection(report, rng).run(edge.port, budget, fuzzer)

    sampler = asyncio.create_task(sample_rss())
    try:
        await asyncio.gather(*(worker(n) for n in range(concurrency)))
    finally:
        stop.set()
        await publishing
        await sampler
    if not sampled.is_set():
        report.rss_before = report.rss_start
    report.frames_read = (await gauges(edge, "frames_received_total"))["frames_received_total"]
    report.held = await left_behind(edge)
    with contextlib.suppress(OSError, RuntimeError):
        report.rss_after = edge.rss_kib()
        report.rss_max = max(report.rss_max, report.rss_after)
    target = last[BYSTANDER]
    with contextlib.suppress(TimeoutError):
        await bystander.wait_for(lambda: bystander.offsets[BYSTANDER][-1:] == [target], 20)
    offsets = bystander.offsets[BYSTANDER]
    contiguous = offsets == list(range(offsets[0], offsets[0] + len(offsets))) if offsets else False
    report.bystander_ok = (contiguous and offsets[-1:] == [target]
                           and not bystander.closed.done())
    report.bystander = (f"{len(offsets):,} publications, offsets {offsets[:1]}..{offsets[-1:]}, "
                        f"last published {target}, contiguous {contiguous}, "
                        f"closed {bystander.closed.done()}")
    await bystander.close()


def main() -> int:
    from fanout.embedded import EmbeddedValkey

    p = argparse.ArgumentParser(description="Fuzz a real edge process (see the module doc).")
    p.add_argument("--frames", type=int, default=1_000_000, help="frames to send (1000000)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=16, help="connections at once (16)")
    p.add_argument("--rss-limit-mib", type=float, default=64.0,
                   help="how far the edge's RSS may grow past its size after the warm-up")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL"),
                   help="a disposable Redis/Valkey (default: an embedded Valkey)")
    args = p.parse_args()
    valkey = None
    url = args.redis_url
    if not url:
        valkey = EmbeddedValkey()
        valkey.start()
        url = valkey.url
    prefix = f"fuzz{os.urandom(3).hex()}"
    try:
        report = asyncio.run(run_live_fuzz(url, prefix, frames=args.frames, seed=args.seed,
                                           concurrency=args.concurrency,
                                           rss_limit_mib=args.rss_limit_mib, progress=True))
    finally:
        if valkey is not None:
            valkey.stop()
    print(report.text())
    failures = report.failures
    print("FAILED: " + ", ".join(failures) if failures else "OK: nothing undocumented")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
