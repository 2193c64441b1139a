"""Benchmark helpers: process control, RSS, and simulated devices (mosquitto: ``fedge.hub.mosquitto``).

Simulated devices (``python -m bench._sim --port P --fleet F --first 0 --count 125 --shapes JSON``):
each is its own paho MQTT connection that says it is online (retained presence, offline as its
will) and answers every round announce that selects it with a small valid ``ModelUpdate`` at
once. One process multiplexes ``count`` clients (paho network threads); it prints ``READY <n>``
when all are connected and runs until SIGTERM or stdin closes. Another bench may run its own device class
through :func:`sim_main` (``bench/secagg.py``: SecAgg devices) and read its figures with a ``STATS`` line on stdin.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedge.hub.mosquitto import stop_process as hub_stop_process

__all__ = ["rss_mb", "sim_main"]


def rss_mb(pid: int) -> float:
    """VmRSS of a process in MB (from /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = 15.0) -> None:
    hub_stop_process(proc, timeout_s)


# -- simulated devices (run in their own processes) ---------------------------------------------------
class _SimDevice:
    def __init__(self, name: str, host: str, port: int, fleet: str, shapes: dict[str, list[int]],
                 on_ready: threading.Semaphore, rng: np.random.Generator) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from fedge.protocol.codec import encode
        from fedge.protocol.messages import Presence
        from fedge.protocol.topics import Topics

        self.name, self.fleet, self.topics = name, fleet, Topics(fleet)
        self.delta = {k: (rng.standard_normal(s) * 1e-3).astype(np.float32) for k, s in shapes.items()}
        self.done: set[int] = set()
        self.on_ready = on_ready
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311,
                                  clean_session=True)
        self.client.max_queued_messages_set(0)
        offline = encode(Presence(fleet, name, online=False))
        self.client.will_set(self.topics.presence(name), offline, qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect_async(host, port, keepalive=60)
        self.client.loop_start()

    def _on_connect(self, client: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        from fedge.protocol.codec import encode

        if reason.is_failure:
            return
        client.subscribe(self.topics.announce, qos=1)
        client.publish(self.topics.presence(self.name), encode(self.presence()), qos=1, retain=True)
        self.on_ready.release()

    def presence(self) -> Any:
        """The retained online presence (a subclass may announce more capabilities)."""
        from fedge.protocol.messages import Presence

        return Presence(self.fleet, self.name, online=True, n_samples=10, backends=("sim",), model_version="v0")

    def _on_message(self, client: Any, _u: Any, msg: Any) -> None:
        from fedge.protocol.codec import decode, encode
        from fedge.protocol.messages import ModelUpdate, RoundAnnounce

        if not msg.payload:
            return
        ann = decode(msg.payload)
        if not isinstance(ann, RoundAnnounce) or self.name not in ann.selected or ann.round in self.done:
            return
        self.done.add(ann.round)
        up = ModelUpdate(self.fleet, ann.round, self.name, ann.model_version, 10, dict(self.delta),
                         {"loss": 1.0, "train_seconds": 0.0})
        client.publish(self.topics.update(self.name), encode(up), qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def sim_main(argv: Sequence[str] | None = None, device_cls: type[_SimDevice] = _SimDevice,
             stats: Callable[[list[Any]], dict[str, Any]] | None = None) -> int:
    """Run the simulated devices (``device_cls``); a ``STATS`` line on stdin prints ``STATS <json of stats(devices)>``
    (when ``stats`` is given)."""
    p = argparse.ArgumentParser(prog="python -m bench._sim", description="simulated fedge devices")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--fleet", required=True)
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--count", type=int, default=125)
    p.add_argument("--shapes", required=True, help='JSON {"h0_kernel": [64, 32], ...}')
    args = p.parse_args(argv)
    shapes = json.loads(args.shapes)
    ready = threading.Semaphore(0)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def watch_stdin() -> None:
        for line in sys.stdin:
            if line.strip() == "STATS" and stats is not None:
                print(f"STATS {json.dumps(stats(devices))}", flush=True)
        stop.set()  # EOF: the parent is gone or asked us to stop

    devices: list[_SimDevice] = []
    threading.Thread(target=watch_stdin, daemon=True).start()
    for i in range(args.first, args.first + args.count):
        devices.append(device_cls(f"sim-{i:04d}", args.host, args.port, args.fleet, shapes, ready,
                                  np.random.default_rng(i)))
        time.sleep(0.002)  # do not hammer the broker's accept queue
    for _ in devices:
        if not ready.acquire(timeout=60):
            print("FAILED not all simulated devices connected", flush=True)
            return 1
    print(f"READY {len(devices)}", flush=True)
    stop.wait()
    for d in devices:
        d.close()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(sim_main())
