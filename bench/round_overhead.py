"""Round overhead of the fedge hub over a real mosquitto on loopback; prints ONE JSON object.

``python bench/round_overhead.py --json``

- ``overhead_s_median_20``: 20 real agent processes (tiny local training); per round, wall time from
  the control publish to the RoundResult minus the slowest device's own work (its ``device_seconds``: loading the
  head, training, personalisation and its validation scores; ``train_seconds`` from agents that do not report it).
- ``overhead_s_median_500``: 500 simulated devices (own paho connection each, 4 processes × 125)
  answering the announce at once with a small valid update; wall time from control to result.
- ``aggregation_mb_per_s``: ``hub.strategies`` FedAvg aggregator, 1,000 updates of 100k float32 parameters: adding
  them and combining them (weight cap, norm bound, weighted sum) as the round closes.
- ``hub_rss_growth_mb``: hub VmRSS after 1,000 accepted updates minus after 100.
Progress goes to stderr, the JSON to stdout. Everything runs in a temp dir and is cleaned up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._sim import rss_mb, stop_process  # noqa: E402
from bench._targets import ROUND_OVERHEAD, finish  # noqa: E402
from fedge.hub.mosquitto import Mosquitto  # noqa: E402
from fedge.protocol.codec import decode  # noqa: E402
from fedge.protocol.messages import Ack, Arrays, HubStatus, ModelUpdate, Presence, RoundResult  # noqa: E402
from fedge.protocol.mqtt_config import BrokerConfig  # noqa: E402
from fedge.protocol.tomlfile import write_toml  # noqa: E402
from fedge.protocol.topics import Topics  # noqa: E402
from fedge.protocol.transport_mqtt import MqttTransport  # noqa: E402

FLEET = "bench"  # the aggregation micro-benchmark's fleet; each scenario has its own (retained state)
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}


def say(text: str) -> None:
    print(f"[round_overhead] {text}", file=sys.stderr, flush=True)


def hub_cmd(config: Path) -> list[str]:
    return [sys.executable, "-m", "fedge.cli", "hub", "serve", "--config", str(config)]


def write_hub_toml(path: Path, fleet: str, state: Path, artifacts: Path, port: int, eval_file: Path | None,
                   min_devices: int) -> None:
    write_toml(path, {
        "fleet": fleet, "state_dir": state, "artifacts": artifacts, "eval_data": eval_file,
        "broker": {"url": f"mqtt://127.0.0.1:{port}"},
        "rounds": {"min_devices": min_devices, "deadline_s": 120.0, "local_epochs": 1, "lr": 0.1},
    })


class Watcher:
    """Records results, acks and the updates' train_seconds; ``on_ack`` sees the running ack count."""

    def __init__(self, url: str, fleet: str, on_ack: Callable[[int], None] | None = None) -> None:
        self.topics = Topics(fleet)
        self.cond = threading.Condition()
        self.results: dict[int, tuple[RoundResult, float]] = {}
        self.train_s: dict[int, list[float]] = {}
        self.acks = 0
        self.online: set[str] = set()
        self.on_ack = on_ack
        self.t = MqttTransport(BrokerConfig(url=url), f"bench-watch-{fleet}-{os.getpid()}", session_expiry_s=0)
        self.t.connect(10)
        self.t.subscribe(self.topics.control_round_result, self._on)  # the operators' copy: names the cohort
        self.t.subscribe(f"{self.topics.base}/device/+/ack", self._on)
        self.t.subscribe(self.topics.presence_all, self._on)
        self.t.subscribe(self.topics.hub_status, self._on)
        self.hub_online = False

    def watch_updates(self) -> None:
        self.t.subscribe(self.topics.update_all, self._on)

    def _on(self, _topic: str, payload: bytes) -> None:
        if not payload:
            return
        now = time.monotonic()
        msg = decode(payload)
        with self.cond:
            if isinstance(msg, RoundResult):
                self.results.setdefault(msg.round, (msg, now))
            elif isinstance(msg, Ack):
                self.acks += 1
                if self.on_ack is not None:
                    self.on_ack(self.acks)
            elif isinstance(msg, ModelUpdate):
                self.train_s.setdefault(msg.round, []).append(
                    float(msg.metrics.get("device_seconds", msg.metrics.get("train_seconds", 0.0))))
            elif isinstance(msg, Presence):
                (self.online.add if msg.online else self.online.discard)(msg.device)
            elif isinstance(msg, HubStatus):
                self.hub_online = msg.online
            self.cond.notify_all()

    def wait(self, pred: Callable[[], bool], timeout_s: float, what: str) -> None:
        with self.cond:
            if not self.cond.wait_for(pred, timeout_s):
                raise RuntimeError(f"timed out after {timeout_s} s waiting for {what}")

    def round(self, rnd: int, timeout_s: float = 120.0) -> tuple[float, RoundResult]:
        """Publish control/round/start and wait for round ``rnd``'s result: (wall seconds, result)."""
        t0 = time.monotonic()
        self.t.publish(self.topics.control_round_start, b"{}")
        self.wait(lambda: rnd in self.results, timeout_s, f"result of round {rnd}")
        res, t1 = self.results[rnd]
        return t1 - t0, res

    def close(self) -> None:
        self.t.close(flush_timeout_s=1)


def prepare(work: Path, n_agents: int, per_device: int) -> tuple[Path, list[Path], Path]:
    from fedge.datasets.partition import make_device_shards, make_eval_set, write_partitions
    from fedge.datasets.shifts import Shift
    from fedge.datasets.source import load_source
    from fedge.export.testing import export_small

    say("exporting a small cnn28 (export_small) and writing shards")
    export_small(work / "artifacts", "cnn28", seed=0)
    source = load_source("auto")
    shards = make_device_shards(source, n_agents, 0.5, 3, Shift(), size_per_device=per_device)
    files = write_partitions(work / "shards", shards, source.num_classes)
    make_eval_set(source, Shift(), 300, 3, work / "eval.npz")
    return work / "artifacts", files, work / "eval.npz"


def bench_agents(work: Path, url: str, port: int, artifacts: Path, shards: list[Path], eval_file: Path,
                 rounds: int) -> dict[str, Any]:
    n = len(shards)
    cfg = work / "hub20.toml"
    fleet = "bench20"
    write_hub_toml(cfg, fleet, work / "state20", artifacts, port, eval_file, n)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    watcher = Watcher(url, fleet)
    watcher.watch_updates()
    try:
        procs.append(subprocess.Popen(hub_cmd(cfg), stdout=(logs / "hub20.log").open("wb"),
                                      stderr=subprocess.STDOUT, env=ENV, cwd=ROOT))
        watcher.wait(lambda: watcher.hub_online, 60, "hub online")
        for i, shard in enumerate(shards):
            dev = f"agent-{i:02d}"
            acfg = work / "agents" / f"{dev}.toml"
            acfg.parent.mkdir(parents=True, exist_ok=True)
            write_toml(acfg, {"device_id": dev, "fleet": fleet, "data": shard, "state_dir": work / "agents" / dev,
                              "seed": i, "broker": {"url": url}})
            procs.append(subprocess.Popen([sys.executable, "-m", "fedge.edge_agent", "run", "--config", str(acfg)],
                                          stdout=(logs / f"{dev}.log").open("wb"), stderr=subprocess.STDOUT,
                                          env=ENV, cwd=ROOT))
        watcher.wait(lambda: len(watcher.online) >= n, 120, f"{n} agents online")
        time.sleep(1.0)  # let the hub record every presence
        say(f"{n} agents online; warm-up round (model install, feature cache)")
        watcher.round(1, 180)
        walls, hub_s, overheads, hub_overheads = [], [], [], []
        for r in range(2, rounds + 2):
            wall, res = watcher.round(r)
            slowest = max(watcher.train_s.get(r, [0.0]))
            if len(res.devices) != n:
                say(f"round {r}: only {len(res.devices)} of {n} devices")
            walls.append(wall)
            hub_s.append(res.seconds)
            overheads.append(wall - slowest)
            hub_overheads.append(res.seconds - slowest)
            say(f"round {r}: wall {wall:.3f} s, hub {res.seconds:.3f} s, slowest device {slowest:.3f} s, "
                f"overhead {wall - slowest:.3f} s")
        return {
            "overhead_s_median_20": round(statistics.median(overheads), 4),
            "overhead_20_hub_clock_s_median": round(statistics.median(hub_overheads), 4),
            "round_wall_s_median_20": round(statistics.median(walls), 4),
            "rounds_20": rounds,
        }
    finally:
        watcher.close()
        for p in procs[1:] + procs[:1]:
            stop_process(p)


def bench_simulated(work: Path, url: str, port: int, artifacts: Path, n: int, procs_n: int,
                    rounds: int) -> dict[str, Any]:
    from fedge.protocol.manifest import load_manifest

    cfg = work / "hub500.toml"
    fleet = "bench500"
    write_hub_toml(cfg, fleet, work / "state500", artifacts, port, None, n)
    shapes = json.dumps({p.name: list(p.shape) for p in load_manifest(artifacts).head})
    rss: dict[int, float] = {}
    procs: list[subprocess.Popen[bytes]] = []
    hub_pid = [0]

    def on_ack(count: int) -> None:
        if count in (100, 1000) and hub_pid[0]:
            rss[count] = rss_mb(hub_pid[0])

    watcher = Watcher(url, fleet, on_ack)
    logs = work / "logs"
    try:
        hub = subprocess.Popen(hub_cmd(cfg), stdout=(logs / "hub500.log").open("wb"), stderr=subprocess.STDOUT,
                               env=ENV, cwd=ROOT)
        procs.append(hub)
        hub_pid[0] = hub.pid
        watcher.wait(lambda: watcher.hub_online, 60, "hub online")
        per = n // procs_n
        sims = []
        for k in range(procs_n):
            sims.append(subprocess.Popen(
                [sys.executable, "-m", "bench._sim", "--port", str(port), "--fleet", fleet, "--first", str(k * per),
                 "--count", str(per), "--shapes", shapes],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=(logs / f"sim{k}.log").open("wb"),
                env=ENV, cwd=ROOT))
        procs.extend(sims)
        for s in sims:
            assert s.stdout is not None
            line = s.stdout.readline().decode().strip()
            if not line.startswith("READY"):
                raise RuntimeError(f"simulated devices failed: {line!r}")
        watcher.wait(lambda: len(watcher.online) >= per * procs_n, 60, "simulated devices online")
        time.sleep(2.0)  # let the hub record every presence
        say(f"{per * procs_n} simulated devices online (hub RSS {rss_mb(hub.pid):.1f} MB); warm-up round")
        walls, hub_s = [], []
        for r in range(1, rounds + 2):
            wall, res = watcher.round(r)
            say(f"round {r}: {len(res.devices)} devices, wall {wall:.3f} s, hub {res.seconds:.3f} s, "
                f"hub RSS {rss_mb(hub.pid):.1f} MB")
            if r > 1:
                walls.append(wall)
                hub_s.append(res.seconds)
        return {
            "overhead_s_median_500": round(statistics.median(walls), 4),
            "overhead_500_hub_clock_s_median": round(statistics.median(hub_s), 4),
            "devices_500": len(res.devices),
            "hub_rss_mb_after_100": round(rss.get(100, float("nan")), 2),
            "hub_rss_mb_after_1000": round(rss.get(1000, float("nan")), 2),
            "hub_rss_growth_mb": round(rss.get(1000, float("nan")) - rss.get(100, float("nan")), 2),
        }
    finally:
        watcher.close()
        for p in procs[1:] + procs[:1]:
            if p.stdin is not None:
                p.stdin.close()
            stop_process(p)


def bench_aggregation(updates: int = 1000, params: int = 100_000, distinct: int = 50) -> dict[str, Any]:
    from fedge.core.aggregators import Aggregator
    from fedge.core.validate import Accept, UpdateContext, validate_update
    from fedge.protocol.codec import encode

    rng = np.random.default_rng(0)
    shape = (params // 100, 100)
    deltas: list[Arrays] = [{"h0_kernel": rng.standard_normal(shape).astype(np.float32)} for _ in range(distinct)]
    agg = Aggregator({"h0_kernel": shape}, 0.01)
    t0 = time.perf_counter()
    for i in range(updates):
        agg.add(deltas[i % distinct], 10 + i % 7)
    agg.mean_delta()  # the weight cap, the norm bound and the weighted sum happen when the round closes
    secs = time.perf_counter() - t0
    mb = updates * params * 4 / 1e6
    # the hub's full path per update: decode + validate + aggregate
    payloads = [encode(ModelUpdate(FLEET, 1, f"d{i}", "v0", 10, d)) for i, d in enumerate(deltas)]
    ctx = UpdateContext(FLEET, frozenset(f"d{i}" for i in range(distinct)), 1, "v0",
                        frozenset(f"d{i}" for i in range(distinct)), {}, {"h0_kernel": (shape, "float32")},
                        1 << 30)
    agg2 = Aggregator({"h0_kernel": shape}, 0.0)
    t0 = time.perf_counter()
    for i in range(updates):
        v = validate_update(f"d{i % distinct}", payloads[i % distinct], ctx)
        if not isinstance(v, Accept):
            raise RuntimeError(f"benchmark update not accepted: {v}")
        agg2.add(v.update.delta, v.update.n_samples)
    secs2 = time.perf_counter() - t0
    return {"aggregation_mb_per_s": round(mb / secs, 1), "decode_validate_aggregate_mb_per_s": round(mb / secs2, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object (else a table of figures and targets)")
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds per scenario (after one warm-up)")
    ap.add_argument("--agents", type=int, default=20)
    ap.add_argument("--simulated", type=int, default=500)
    ap.add_argument("--sim-procs", type=int, default=4)
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs) instead of deleting it")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedge-bench-"))
    out: dict[str, Any] = {"bench": "bench/round_overhead.py", "agents": args.agents, "simulated": args.simulated}
    broker = None
    try:
        say("aggregation throughput")
        out.update(bench_aggregation())
        artifacts, shards, eval_file = prepare(work, args.agents, 100)
        broker = Mosquitto(work / "mosquitto", persistence=False).start()
        say(f"mosquitto on :{broker.port}")
        out.update(bench_agents(work, broker.url, broker.port, artifacts, shards, eval_file, args.rounds))
        out.update(bench_simulated(work, broker.url, broker.port, artifacts, args.simulated, args.sim_procs,
                                   max(args.rounds - 2, 3)))
    finally:
        if broker is not None:
            broker.stop()
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return finish(out, ROUND_OVERHEAD, args.json)


if __name__ == "__main__":
    sys.exit(main())
