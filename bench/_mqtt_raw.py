"""A minimal MQTT 3.1.1 client for load generation (``bench/_swarm.py``), not for fedge itself (which uses paho).

Why not paho here: the simulator shares the bench machine's cores with the hub and the broker, and paho spends about
a hundred microseconds of Python per QoS 1 message (a message object, a condition, a wake-up of its network thread
and a send per packet). This client writes a round's updates as pre-built PUBLISH packets in a few large writes and
reads PUBACKs, SUBACKs and incoming PUBLISH packets on one thread; what the broker and the hub see on the wire is the
same MQTT 3.1.1 (QoS 1 both ways, retained presences, exact and wildcard subscriptions).

Only what the simulator needs: CONNECT (clean session, optional user name and password, keep-alive off), SUBSCRIBE
(QoS 1), PUBLISH QoS 1 (optionally retained) out, PUBLISH QoS 0/1 in (acknowledged at once), PUBACK, SUBACK, CONNACK.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Iterable

__all__ = ["RawMqtt", "publish_packet"]

OnMessage = Callable[[str, bytes], None]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack(">H", len(b)) + b


def publish_packet(topic: str, payload: bytes, pid: int, *, retain: bool = False) -> bytes:
    """One QoS 1 PUBLISH packet."""
    body = _str(topic) + struct.pack(">H", pid) + payload
    return bytes([0x32 | (1 if retain else 0)]) + _varint(len(body)) + body


class RawMqtt:
    """One MQTT 3.1.1 connection: ``publish_many`` sends QoS 1 messages in bulk; ``on_message`` sees incoming ones
    (on the reader thread); ``pubacks`` counts the broker's acknowledgements."""

    def __init__(self, host: str, port: int, client_id: str, *, username: str | None = None,
                 password: str | None = None, on_message: OnMessage | None = None, timeout_s: float = 30.0) -> None:
        self.on_message = on_message
        self.pubacks = 0
        self._pid = 0
        self._send_lock = threading.Lock()
        self._publish_lock = threading.Lock()
        self._cond = threading.Condition()
        self._subacks: set[int] = set()
        self._connack: int | None = None
        self._closed = False
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        flags = 0x02 | (0x80 if username else 0) | (0x40 if password else 0)  # clean session
        body = _str("MQTT") + bytes([4, flags]) + struct.pack(">H", 0) + _str(client_id)
        if username:
            body += _str(username)
        if password:
            body += _str(password)
        self._send(bytes([0x10]) + _varint(len(body)) + body)
        self.sock.settimeout(None)
        self._reader = threading.Thread(target=self._read_loop, name=f"raw-mqtt-{client_id}", daemon=True)
        self._reader.start()
        with self._cond:
            if not self._cond.wait_for(lambda: self._connack is not None, timeout_s):
                raise ConnectionError(f"{client_id}: no CONNACK in {timeout_s} s")
        if self._connack:
            raise ConnectionError(f"{client_id}: CONNACK return code {self._connack}")

    def next_pid(self) -> int:
        self._pid = self._pid % 65535 + 1
        return self._pid

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def subscribe(self, filters: Iterable[str], timeout_s: float = 60.0) -> None:
        """SUBSCRIBE (QoS 1) to ``filters`` in packets of 200; returns once every SUBACK arrived."""
        todo = list(filters)
        pids = []
        for i in range(0, len(todo), 200):
            pid = self.next_pid()
            body = struct.pack(">H", pid) + b"".join(_str(f) + b"\x01" for f in todo[i:i + 200])
            with self._cond:
                self._subacks.add(pid)
            pids.append(pid)
            self._send(bytes([0x82]) + _varint(len(body)) + body)
        with self._cond:
            if not self._cond.wait_for(lambda: not self._subacks.intersection(pids), timeout_s):
                raise TimeoutError("SUBACKs missing")

    def publish_many(self, messages: Iterable[tuple[str, bytes, bool]], chunk: int = 1 << 20) -> int:
        """Send QoS 1 PUBLISH packets for ``(topic, payload, retain)`` in writes of about ``chunk`` bytes."""
        buf: list[bytes] = []
        size = count = 0
        with self._publish_lock:  # packet ids in order, one publisher at a time
            for topic, payload, retain in messages:
                packet = publish_packet(topic, payload, self.next_pid(), retain=retain)
                buf.append(packet)
                size += len(packet)
                count += 1
                if size >= chunk:
                    self._send(b"".join(buf))
                    buf, size = [], 0
            if buf:
                self._send(b"".join(buf))
        return count

    def wait_pubacks(self, total: int, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.pubacks >= total, timeout_s)

    def _read_loop(self) -> None:
        buf = b""
        try:
            while True:
                data = self.sock.recv(1 << 16)
                if not data:
                    return
                buf += data
                buf = self._packets(buf)
        except OSError:
            return
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    def _packets(self, buf: bytes) -> bytes:
        """Handle every complete packet in ``buf``; return the incomplete rest."""
        at, n = 0, len(buf)
        acks = 0
        while True:
            if n - at < 2:
                break
            length, mult, i = 0, 1, at + 1
            while True:
                if i >= n:
                    return buf[at:]
                byte = buf[i]
                length += (byte & 0x7F) * mult
                mult *= 128
                i += 1
                if not byte & 0x80:
                    break
            if i + length > n:
                break
            first, body = buf[at], buf[i:i + length]
            at = i + length
            kind = first >> 4
            if kind == 4:  # PUBACK
                acks += 1
            elif kind == 3:  # PUBLISH
                self._incoming(first, body)
            elif kind == 9:  # SUBACK
                (pid,) = struct.unpack_from(">H", body)
                with self._cond:
                    self._subacks.discard(pid)
                    self._cond.notify_all()
            elif kind == 2:  # CONNACK
                with self._cond:
                    self._connack = body[1]
                    self._cond.notify_all()
        if acks:
            with self._cond:
                self.pubacks += acks
                self._cond.notify_all()
        return buf[at:]

    def _incoming(self, first: int, body: bytes) -> None:
        """An incoming PUBLISH: acknowledged at once (QoS 1), then handed to ``on_message``."""
        qos = (first >> 1) & 3
        (tlen,) = struct.unpack_from(">H", body)
        topic = body[2:2 + tlen].decode()
        at = 2 + tlen
        if qos:
            self._send(b"\x40\x02" + body[at:at + 2])
            at += 2
        if self.on_message is not None:
            self.on_message(topic, body[at:])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._send(b"\xe0\x00")  # DISCONNECT
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
