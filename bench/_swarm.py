"""Many simulated devices on a few MQTT connections (``bench/scale.py``): the hub cannot tell them from real ones.

``python -m bench._swarm --port P --fleet F --first 0 --count 5000 --conns 4 --shapes JSON [--username U --password
W]``: ``count`` devices ``sim-<i>`` shared round-robin among ``conns`` paho connections (MQTT 3.1.1, clean sessions).
Each connection (a minimal MQTT 3.1.1 client, ``bench/_mqtt_raw.py``: paho's per-message cost would make the
simulator, not the hub, the measurement) publishes its devices' retained online presences, subscribes to the round
announce and the hub's status (exact topics, retained) and to each of its devices' inboxes (``device/<d>/+``, QoS 1:
the hub's acks reach the device they are for, as with real devices; ``--no-inbox`` leaves them undelivered), and
answers every announce that selects its devices with one valid ``ModelUpdate`` per device, at once: an update's
frame is built from a per-device template (the delta's bytes encoded once at start; per round only the small JSON
header changes), so the simulator spends microseconds per device, not the hub's milliseconds.
Prints ``READY <n>`` once every presence is out and every subscription acknowledged; then ``STATS`` on stdin prints
``STATS {"acks": n, "updates": n, "rounds": {...}}``; stdin EOF or SIGTERM stops it. What this leaves out of a real
fleet: one TCP connection per device at the broker (here ``conns`` carry them all) and the devices' training.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["swarm_main"]


class _Template:
    """A device's ModelUpdate frame with everything but the header fixed (the codec's layout, PROTOCOL.md "Frame")."""

    def __init__(self, fleet: str, device: str, shapes: dict[str, list[int]], rng: np.random.Generator) -> None:
        from fedge.protocol.codec import encode, frame_header
        from fedge.protocol.messages import Arrays, ModelUpdate

        delta: Arrays = {k: (rng.standard_normal(s) * 1e-3).astype(np.float32) for k, s in shapes.items()}
        frame = encode(ModelUpdate(fleet, 0, device, "v0", 10, delta, {"loss": 1.0, "train_seconds": 0.0}))
        header, data = frame_header(frame)
        self.header = header
        self.data = bytes(data)

    def frame(self, rnd: int, model_version: str) -> bytes:
        import struct

        from fedge.protocol.codec import MAGIC, PREFIX_LEN
        from fedge.protocol.messages import PROTOCOL_VERSION, new_nonce

        header = dict(self.header, round=rnd, model_version=model_version, nonce=new_nonce(), ts=time.time())
        text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
        text += b" " * ((-(PREFIX_LEN + len(text))) % 8)
        return b"".join([MAGIC, bytes([PROTOCOL_VERSION]), struct.pack("<I", len(text)), text, self.data])


class _Connection:
    """One MQTT connection (``bench/_mqtt_raw.py``) publishing for many devices."""

    def __init__(self, name: str, args: argparse.Namespace, devices: list[str], shapes: dict[str, list[int]],
                 stats: dict[str, Any], lock: threading.Lock) -> None:
        from bench._mqtt_raw import RawMqtt
        from fedge.protocol.topics import Topics

        self.topics = Topics(args.fleet)
        self.devices = devices
        self.owned = frozenset(devices)
        self.templates = {d: _Template(args.fleet, d, shapes, np.random.default_rng(int(d.split("-")[1])))
                          for d in devices}
        self.stats, self.lock = stats, lock
        self.done: set[int] = set()
        self.hub_online = False
        self.ready = threading.Event()
        self.sent = 0
        self.mqtt = RawMqtt(args.host, args.port, name, username=args.username, password=args.password,
                            on_message=self._on_message)
        filters = [self.topics.announce, self.topics.hub_status]
        if args.inbox:
            filters += [self.topics.device_inbox(d) for d in devices]
        self.mqtt.subscribe(filters)
        self._presences()
        self.ready.set()

    def _presences(self) -> None:
        from fedge.protocol.codec import encode
        from fedge.protocol.messages import Presence

        self.sent += self.mqtt.publish_many(
            (self.topics.presence(d), encode(Presence(self.topics.fleet, d, online=True, n_samples=10,
                                                       backends=("sim",), model_version="v0")), True)
            for d in self.devices)
        if not self.mqtt.wait_pubacks(self.sent, 120):
            raise TimeoutError("presences not acknowledged")

    def _on_message(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        from fedge.protocol.codec import decode
        from fedge.protocol.messages import HubStatus, RoundAnnounce

        if topic == self.topics.hub_status:
            # as agents do: presences again when a hub comes up (RabbitMQ keeps retained presences from the hub's
            # wildcard subscription)
            status = decode(payload)
            online = isinstance(status, HubStatus) and status.online
            if online and not self.hub_online and self.ready.is_set():
                threading.Thread(target=self._presences, daemon=True).start()
            self.hub_online = online
            return
        if topic != self.topics.announce:
            with self.lock:
                self.stats["acks"] += 1
            return
        ann = decode(payload, max_bytes=1 << 24)
        if not isinstance(ann, RoundAnnounce) or ann.round in self.done:
            return
        self.done.add(ann.round)
        mine = [d for d in ann.selected if d in self.owned]
        threading.Thread(target=self._answer, args=(ann.round, ann.model_version, mine), daemon=True).start()

    def _answer(self, rnd: int, model_version: str, devices: list[str]) -> None:
        t0 = time.thread_time()
        self.sent += self.mqtt.publish_many(
            (self.topics.update(d), self.templates[d].frame(rnd, model_version), False) for d in devices)
        with self.lock:
            self.stats["updates"] += len(devices)
            self.stats["answer_cpu_s"] += time.thread_time() - t0

    def close(self) -> None:
        self.mqtt.close()


def swarm_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench._swarm", description="many simulated fedge devices")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--fleet", required=True)
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--conns", type=int, default=4)
    p.add_argument("--shapes", required=True, help='JSON {"h0_kernel": [64, 32], ...}')
    p.add_argument("--username")
    p.add_argument("--password")
    p.add_argument("--no-inbox", dest="inbox", action="store_false",
                   help="do not subscribe to the devices' inboxes (the hub's acks then reach nobody)")
    args = p.parse_args(argv)
    shapes = json.loads(args.shapes)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stats: dict[str, Any] = {"acks": 0, "updates": 0, "answer_cpu_s": 0.0}
    lock = threading.Lock()
    names = [f"sim-{i:05d}" for i in range(args.first, args.first + args.count)]
    conns: list[_Connection] = []
    for k in range(args.conns):
        conns.append(_Connection(f"swarm-{args.fleet}-{args.first}-{k}-{os.getpid()}", args, names[k::args.conns],
                                 shapes, stats, lock))

    def watch_stdin() -> None:
        for line in sys.stdin:
            if line.strip() == "STATS":
                with lock:
                    print(f"STATS {json.dumps(stats)}", flush=True)
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    for c in conns:
        if not c.ready.wait(300):
            print("FAILED not every simulated device is online", flush=True)
            return 1
    print(f"READY {len(names)}", flush=True)
    stop.wait()
    for c in conns:
        c.close()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(swarm_main())
