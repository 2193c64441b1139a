"""Many simulated devices on a few MQTT connections (``bench/scale.py``): the hub cannot tell them from real ones.

``python -m bench._swarm --port P --fleet F --first 0 --count 5000 --conns 4 --shapes JSON [--username U --password
W]``: ``count`` devices ``sim-<i>`` shared round-robin among ``conns`` paho connections (MQTT 3.1.1, clean sessions).
Each connection publishes its devices' retained online presences, subscribes to the round announce (exact topic,
retained) and to each of its devices' inboxes (``device/<d>/+``: the hub's acks reach the device they are for, as
with real devices), and answers every announce that selects its devices with one valid ``ModelUpdate`` per device,
at once: an update's frame is built from a per-device template (the delta's bytes encoded once at start; per round
only the small JSON header changes), so the simulator spends microseconds per device, not the hub's milliseconds.
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
    """One paho connection publishing for many devices."""

    def __init__(self, name: str, args: argparse.Namespace, devices: list[str], shapes: dict[str, list[int]],
                 stats: dict[str, Any], lock: threading.Lock) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

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
        self._subacks: set[int] = set()
        self._cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311,
                                  clean_session=True)
        if args.username:
            self.client.username_pw_set(args.username, args.password)
        self.client.max_queued_messages_set(0)
        self.client.max_inflight_messages_set(1000)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.connect_async(args.host, args.port, keepalive=120)
        self.client.loop_start()

    def _on_connect(self, client: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            print(f"FAILED connect: {reason}", file=sys.stderr, flush=True)
            return
        threading.Thread(target=self._setup, daemon=True).start()  # not on the network thread: it must run

    def _setup(self) -> None:
        filters = [(self.topics.announce, 1), (self.topics.hub_status, 1)] + [
            (self.topics.device_inbox(d), 1) for d in self.devices]
        for i in range(0, len(filters), 200):  # SUBSCRIBE packets of 200 filters
            with self._cond:  # held: the SUBACK's callback cannot run before the mid is recorded
                _rc, mid = self.client.subscribe(filters[i:i + 200])
                if mid is not None:
                    self._subacks.add(mid)
        with self._cond:
            self._cond.wait_for(lambda: not self._subacks, 120)
        self._presences()
        self.ready.set()

    def _presences(self) -> None:
        from fedge.protocol.codec import encode
        from fedge.protocol.messages import Presence

        infos = [self.client.publish(self.topics.presence(d), encode(Presence(
            self.topics.fleet, d, online=True, n_samples=10, backends=("sim",), model_version="v0")), qos=1,
            retain=True) for d in self.devices]
        for info in infos:
            info.wait_for_publish(120)

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, _codes: Any, _p: Any) -> None:
        with self._cond:
            self._subacks.discard(mid)
            self._cond.notify_all()

    def _on_message(self, _client: Any, _u: Any, msg: Any) -> None:
        if not msg.payload:
            return
        from fedge.protocol.codec import decode
        from fedge.protocol.messages import HubStatus, RoundAnnounce

        if msg.topic == self.topics.hub_status:
            # as agents do: presences again when a hub comes up (RabbitMQ keeps retained presences from the hub's
            # wildcard subscription)
            status = decode(msg.payload)
            online = isinstance(status, HubStatus) and status.online
            if online and not self.hub_online and self.ready.is_set():
                threading.Thread(target=self._presences, daemon=True).start()
            self.hub_online = online
            return
        if msg.topic != self.topics.announce:
            with self.lock:
                self.stats["acks"] += 1
            return

        ann = decode(msg.payload, max_bytes=1 << 24)
        if not isinstance(ann, RoundAnnounce) or ann.round in self.done:
            return
        self.done.add(ann.round)
        mine = [d for d in ann.selected if d in self.owned]
        threading.Thread(target=self._answer, args=(ann.round, ann.model_version, mine), daemon=True).start()

    def _answer(self, rnd: int, model_version: str, devices: list[str]) -> None:
        t0 = time.thread_time()
        for d in devices:
            self.client.publish(self.topics.update(d), self.templates[d].frame(rnd, model_version), qos=1)
        with self.lock:
            self.stats["updates"] += len(devices)
            self.stats["answer_cpu_s"] += time.thread_time() - t0

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


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
    args = p.parse_args(argv)
    shapes = json.loads(args.shapes)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stats: dict[str, Any] = {"acks": 0, "updates": 0, "answer_cpu_s": 0.0}
    lock = threading.Lock()
    names = [f"sim-{i:05d}" for i in range(args.first, args.first + args.count)]
    conns = [_Connection(f"swarm-{args.fleet}-{args.first}-{k}-{os.getpid()}", args, names[k::args.conns], shapes,
                         stats, lock) for k in range(args.conns)]

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
