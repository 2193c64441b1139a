"""SecAgg+ benchmark: round overhead over MQTT, device cost per stage, distributed vs central DP; ONE JSON object.

``python bench/secagg.py --json``

* ``secagg_overhead_s_{10,100,500,1000}``: per cohort size n, a real hub (``fedge hub serve``) on a real mosquitto
  with n simulated devices, each its own paho connection (``bench._sim``; a SecAgg device runs
  ``edge_agent.secagg_session.DeviceSession``: advertise on the announce, answer the hub's stage frames, masked
  input of a random small quantised update at once). Median wall time from ``control/round/start`` to the
  ``RoundResult`` of a SecAgg round (``[secagg] enabled = true``) minus that of a plain round, same n, same bench
  process, fresh fleet and hub per mode. Targets: n = 100 <= 3 s, n = 500 and n = 1000 <= 15 s. The simulated
  devices' cryptography runs on the bench's cores too (``secagg_cpu_s_sims_1000``), in one worker thread per sim
  process (the paho network threads only read and write: with the work on 250 network threads per process, the
  GIL hand-offs made each device's CPU 5-10x its uncontended figure and the n = 1000 round 12-22 s); the hub's share
  is ``secagg_cpu_s_hub_1000`` and ``hub_s_1000_in_process``.
* ``device_{cpu_s,bytes}_<stage>_<n>``: per device and round, the thread CPU seconds of the session calls and the
  bytes of the frames it published, for each stage (advertise, share, masked, unmask); ``..._500_in_process``: the
  same session calls in one uncontended thread (the sim processes' figures inflate under CPU contention).
  ``{plain,secagg}_cpu_s_{hub,sims,broker}_<n>``: CPU seconds per round of the hub, the simulator processes and
  mosquitto (/proc): what the wall time is made of on this machine.
  ``device_bytes_<n>_over_10``: total bytes a device sends per round at n over n = 10. Target (n = 500) <= 4
  (O(log n) neighbours; the masked input's size does not depend on n).
* ``hub_stage_s_<stage>_<n>``: seconds from the previous stage's close (advertise: from the round's opening) to
  this stage's close, from the hub's log, median over the measured rounds.
* ``hub_profile_*``: the hub's side of one n = 500 round in process (decode, ``SecAggCoordinator.receive``/
  ``step``, frame encoding; devices not counted), under cProfile: seconds per stage and the top functions. The
  unmasked sum is checked against the plain sum of the devices' quantised inputs (``secagg_sum_exact``).
* ``accuracy_distributed_eps8`` next to ``accuracy_central_eps8`` (amplified, privacy_utility's headline) and
  ``accuracy_central_eps8_unamplified``: the privacy_utility task (1,000 devices, q = 0.1, 50 rounds, delta 1e-5,
  C = 1, same seeds, trainer and evaluator). Distributed: each device clips to C, adds N(0, (zC)^2/m)
  (``private_input``), quantises under the round's SecAggConfig; the quantised vectors are summed mod 2^bits (the
  masking cancels exactly: see ``secagg_sum_exact``), de-quantised and divided by q*N (``SecureSumAggregator``);
  a Poisson cohort below m is skipped as the hub skips it (nothing announced). z from ``noise_for_epsilon`` on the
  distributed event ``DpEvent(z)`` (not amplified). ``distributed_minus_central_points``: distributed minus
  central (amplified) accuracy, points. Target >= -1.

``loadavg_1m_start``/``_end``: the machine's load around the run (other work on the cores moves the MQTT figures).
Progress goes to stderr. Work in a temp dir (the DP part reuses privacy_utility's work folder and source model).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import pstats
import queue
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._sim import _SimDevice, rss_mb, sim_main, stop_process  # noqa: E402
from bench._targets import SECAGG, finish  # noqa: E402

STAGES = ("advertise", "share", "masked", "unmask")
SIZES = (10, 100, 500, 1000)
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
# the DP comparison: privacy_utility's task and settings
DP_DEVICES, DP_Q, DP_DELTA, DP_CLIP, DP_EPS = 1000, 0.1, 1e-5, 1.0, 8.0
MIN_COHORT = 70  # min_devices: q*N = 100 less three standard deviations of the Poisson cohort (9.5)
DROPOUT_ALLOWANCE = 0.1  # the hub's default: noise split over m = max(min_devices, ceil(0.9 * cohort))


def say(text: str) -> None:
    print(f"[secagg] {text}", file=sys.stderr, flush=True)


# -- the simulated SecAgg device (runs in the sim processes) ---------------------------------------------------------
class SecAggSimDevice(_SimDevice):
    """A simulated device in SecAgg rounds: one ``DeviceSession`` per round; per stage, the thread CPU time of its
    session calls and the bytes it published are added to :attr:`totals` (shared by the process's devices)."""

    totals: ClassVar[dict[str, list[float]]] = {s: [0.0, 0.0, 0.0] for s in STAGES}  # cpu s, bytes, frames
    lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, name: str, host: str, port: int, fleet: str, shapes: dict[str, list[int]],
                 on_ready: threading.Semaphore, rng: np.random.Generator) -> None:
        from fedge.protocol.topics import Topics

        self.inbox = Topics(fleet).secagg_inbox(name)
        self.sessions: dict[int, Any] = {}
        self.dim = sum(math.prod(s) for s in shapes.values())
        self.rng = rng
        super().__init__(name, host, port, fleet, shapes, on_ready, rng)

    def presence(self) -> Any:
        from dataclasses import replace

        return replace(super().presence(), secagg=True)

    def _on_connect(self, client: Any, u: Any, f: Any, reason: Any, p: Any) -> None:
        if not reason.is_failure:
            client.subscribe(self.inbox, qos=1)
        super()._on_connect(client, u, f, reason, p)

    def _send(self, stage: str, frames: list[bytes], cpu: float) -> None:
        for frame in frames:
            self.client.publish(self.topics.secagg(self.name), frame, qos=1)
        with self.lock:
            t = self.totals[stage]
            t[0] += cpu
            t[1] += sum(len(f) for f in frames)
            t[2] += len(frames)

    def _on_message(self, client: Any, _u: Any, msg: Any) -> None:
        """Hand the message to the process's worker thread: the paho network threads (one per device) only read
        and write, so one thread per process runs the devices' cryptography instead of hundreds of threads taking
        turns at the GIL (which inflated every device's CPU several times over at n = 1000)."""
        if msg.payload:
            _work().put((self, msg.topic, msg.payload))

    def handle(self, topic: str, payload: bytes) -> None:
        from fedge.core.secagg import bounded_input, quantise
        from fedge.core.secagg_session import DeviceSession, is_secagg, stage_of
        from fedge.protocol.codec import decode
        from fedge.protocol.messages import RoundAnnounce, SecAggStage
        from fedge.protocol.secagg_wire import KeysBroadcast, SharesRelay

        m = decode(payload)
        if isinstance(m, SecAggStage) and topic == self.inbox:
            session = self.sessions.get(m.round)
            if session is None:
                return
            inner = stage_of(m)
            stage = "share" if isinstance(inner, KeysBroadcast) else "masked" if isinstance(inner, SharesRelay) \
                else "unmask"
            t0 = time.thread_time()
            frames = session.on_frame(m)
            self._send(stage, frames, time.thread_time() - t0)
            if session.finished:
                del self.sessions[m.round]
            return
        if not isinstance(m, RoundAnnounce) or self.name not in m.selected or m.round in self.done:
            return
        if not is_secagg(m):
            raise RuntimeError("a SecAgg simulated device got a plain round")
        self.done.add(m.round)
        t0 = time.thread_time()
        session = DeviceSession(m, self.name)
        self.sessions[m.round] = session
        frames = session.start()
        self._send("advertise", frames, time.thread_time() - t0)
        t0 = time.thread_time()  # "training": a random small update, quantised under the round's config
        cfg = session.setup.config  # clipped to the announced L2 norm, followed by the norm bit when announced
        q = quantise(bounded_input(self.rng.standard_normal(self.dim) * 1e-3, cfg), cfg, self.rng)
        frames = session.set_input(q)
        self._send("masked", frames, time.thread_time() - t0)


_queue: queue.SimpleQueue[tuple[SecAggSimDevice, str, bytes]] | None = None
_queue_lock = threading.Lock()


def _work() -> queue.SimpleQueue[tuple[SecAggSimDevice, str, bytes]]:
    """The process's work queue, served by one daemon thread (started on first use)."""
    global _queue
    with _queue_lock:
        if _queue is None:
            q: queue.SimpleQueue[tuple[SecAggSimDevice, str, bytes]] = queue.SimpleQueue()

            def serve() -> None:
                while True:
                    device, topic, payload = q.get()
                    try:
                        device.handle(topic, payload)
                    except Exception as exc:  # a simulated device's failure is logged, not fatal
                        print(f"{device.name}: {exc!r}", file=sys.stderr, flush=True)

            threading.Thread(target=serve, daemon=True, name="secagg-devices").start()
            _queue = q
        return _queue


def _totals(_devices: list[Any]) -> dict[str, Any]:
    with SecAggSimDevice.lock:
        return {s: list(v) for s, v in SecAggSimDevice.totals.items()}


def sim_entry(argv: Sequence[str]) -> int:
    """``python -m bench.secagg sim [--secagg] <bench._sim args>``."""
    args = list(argv)
    if "--secagg" in args:
        args.remove("--secagg")
        return sim_main(args, SecAggSimDevice, _totals)
    return sim_main(args)


# -- one scenario: (mode, n) over MQTT ------------------------------------------------------------------------------
def _hub_toml(path: Path, fleet: str, work: Path, artifacts: Path, port: int, n: int, secagg: bool) -> None:
    from fedge.protocol.tomlfile import write_toml

    table: dict[str, Any] = {
        "fleet": fleet, "state_dir": work / f"state-{fleet}", "artifacts": artifacts,
        "broker": {"url": f"mqtt://127.0.0.1:{port}"},
        "rounds": {"min_devices": n, "deadline_s": 120.0, "local_epochs": 1, "lr": 0.1},
    }
    if secagg:
        table["secagg"] = {"enabled": True, "stage_timeout_s": 30.0}
    write_toml(path, table)


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def _stage_times(log: Path, rounds: Sequence[int]) -> dict[str, float]:
    """Median seconds from a round's opening to each SecAgg stage closing (hub log timestamps)."""
    marks: dict[int, dict[str, float]] = {}
    for line in log.read_text(errors="replace").splitlines():
        m = _STAMP.match(line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if (o := re.search(r"round (\d+) open:", line)):
            marks.setdefault(int(o.group(1)), {})["open"] = t
        elif (c := re.search(r"round (\d+): secagg stage (\w+) closed", line)):
            marks.setdefault(int(c.group(1)), {})[c.group(2)] = t
        elif (s := re.search(r"round (\d+): secure sum of", line)):
            marks.setdefault(int(s.group(1)), {})["unmask"] = t
    out: dict[str, float] = {}
    for stage in ("advertise", "share", "mask", "unmask"):
        prev = {"advertise": "open", "share": "advertise", "mask": "share", "unmask": "mask"}[stage]
        d = [marks[r][stage] - marks[r][prev] for r in rounds if stage in marks.get(r, {}) and prev in marks[r]]
        if d:
            out[stage] = round(statistics.median(d), 4)
    return out


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_scenario(work: Path, url: str, port: int, artifacts: Path, shapes: str, n: int, secagg: bool,
                   rounds: int, broker_pid: int) -> dict[str, Any]:
    from bench.round_overhead import Watcher, hub_cmd

    mode = "secagg" if secagg else "plain"
    fleet = f"sa-{mode}-{n}"
    cfg = work / f"hub-{fleet}.toml"
    _hub_toml(cfg, fleet, work, artifacts, port, n, secagg)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    hub_log = logs / f"hub-{fleet}.log"
    procs_n = 1 if n <= 50 else 2 if n <= 250 else 4
    per = [n // procs_n + (1 if k < n % procs_n else 0) for k in range(procs_n)]
    procs: list[subprocess.Popen[bytes]] = []
    sims: list[subprocess.Popen[bytes]] = []
    watcher = Watcher(url, fleet)

    def totals() -> dict[str, list[float]]:
        acc = {s: [0.0, 0.0, 0.0] for s in STAGES}
        for s in sims:
            assert s.stdin is not None and s.stdout is not None
            s.stdin.write(b"STATS\n")
            s.stdin.flush()
            line = s.stdout.readline().decode().strip()
            if not line.startswith("STATS "):
                raise RuntimeError(f"simulated devices answered {line!r}")
            for stage, v in json.loads(line[6:]).items():
                acc[stage] = [a + b for a, b in zip(acc[stage], v, strict=True)]
        return acc

    try:
        hub = subprocess.Popen(hub_cmd(cfg), stdout=hub_log.open("wb"), stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
        procs.append(hub)
        watcher.wait(lambda: watcher.hub_online, 60, "hub online")
        first = 0
        for k, count in enumerate(per):
            cmd = [sys.executable, "-m", "bench.secagg", "sim", *(["--secagg"] if secagg else []), "--port", str(port),
                   "--fleet", fleet, "--first", str(first), "--count", str(count), "--shapes", shapes]
            first += count
            sims.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=(logs / f"sim-{fleet}-{k}.log").open("wb"), env=ENV, cwd=ROOT))
        procs.extend(sims)
        for s in sims:
            assert s.stdout is not None
            line = s.stdout.readline().decode().strip()
            if not line.startswith("READY"):
                raise RuntimeError(f"simulated devices failed: {line!r} (see {logs})")
        watcher.wait(lambda: len(watcher.online) >= n, 60, f"{n} simulated devices online")
        time.sleep(2.0)  # let the hub record every presence
        walls, hub_s = [], []
        before: dict[str, list[float]] = {}
        cpu0: list[float] = []
        for r in range(1, rounds + 2):
            if r == 2:
                before = totals() if secagg else {}  # the warm-up round is not counted
                cpu0 = [_cpu_s(hub.pid), sum(_cpu_s(s.pid) for s in sims), _cpu_s(broker_pid)]
            wall, res = watcher.round(r, 300)
            say(f"n={n} {mode} round {r}: {res.status}, {len(res.devices)} devices, wall {wall:.3f} s, "
                f"hub {res.seconds:.3f} s, hub RSS {rss_mb(hub.pid):.1f} MB")
            if len(res.devices) != n:
                raise RuntimeError(f"n={n} {mode} round {r}: {res.status} with {len(res.devices)} of {n} devices: "
                                   f"{res.detail}")
            if r > 1:
                walls.append(wall)
                hub_s.append(res.seconds)
        cpu1 = [_cpu_s(hub.pid), sum(_cpu_s(s.pid) for s in sims), _cpu_s(broker_pid)]
        out: dict[str, Any] = {f"{mode}_round_s_{n}": round(statistics.median(walls), 4),
                               f"{mode}_round_hub_clock_s_{n}": round(statistics.median(hub_s), 4)}
        for who, a, b in zip(("hub", "sims", "broker"), cpu0, cpu1, strict=True):  # CPU per round, mean
            out[f"{mode}_cpu_s_{who}_{n}"] = round((b - a) / len(walls), 3)
        if secagg:
            after = totals()
            measured_rounds = len(walls)
            for stage in STAGES:
                cpu, nbytes, frames = (a - b for a, b in zip(after[stage], before[stage], strict=True))
                if frames != n * measured_rounds:
                    say(f"n={n}: {frames:g} {stage} frames in {measured_rounds} rounds of {n} devices")
                out[f"device_cpu_s_{stage}_{n}"] = round(cpu / (n * measured_rounds), 6)
                out[f"device_bytes_{stage}_{n}"] = round(nbytes / (n * measured_rounds), 1)
            out[f"device_bytes_total_{n}"] = round(sum(out[f"device_bytes_{s}_{n}"] for s in STAGES), 1)
            out[f"device_cpu_s_total_{n}"] = round(sum(out[f"device_cpu_s_{s}_{n}"] for s in STAGES), 6)
            for stage, secs in _stage_times(hub_log, range(2, rounds + 2)).items():
                out[f"hub_stage_s_{stage}_{n}"] = secs
        return out
    finally:
        watcher.close()
        for p in procs[1:] + procs[:1]:
            if p.stdin is not None:
                p.stdin.close()
            stop_process(p)


# -- the hub's side of one round, in process, profiled ---------------------------------------------------------------
def profile_hub(n: int, dim: int, top: int = 10, profiled: bool = True) -> dict[str, Any]:
    """One n-device round in process: the hub's seconds per stage (with ``profiled``, under cProfile, and its top
    functions by own time), the devices' uncontended CPU per stage, and whether the unmasked sum is exact."""
    from fedge.core.secagg import SecAggConfig, quantise
    from fedge.core.secagg_round import SecAggCoordinator, SecAggPlan, SecureSum
    from fedge.core.secagg_session import DeviceSession
    from fedge.protocol.codec import decode
    from fedge.protocol.messages import RoundAnnounce, SecAggStage

    fleet, rid = "prof", 1
    cohort = tuple(f"sim-{i:04d}" for i in range(n))
    plan = SecAggPlan.make(fleet, rid, cohort, os.urandom(32), SecAggConfig(), 30.0)
    outbox: list[tuple[str, bytes]] = []
    coord = SecAggCoordinator(fleet, rid, plan, cohort, dim, 0.0, 1e9, lambda d, f: outbox.append((d, f)))
    ann = RoundAnnounce(fleet, rid, "v0", "0" * 64, 1e9, n, cohort, 1, 0.1, secagg_seed=plan.seed,
                        secagg_degree=plan.degree, secagg_threshold=plan.threshold, secagg_ring_bits=plan.ring_bits,
                        secagg_clip=plan.clip, secagg_scale=plan.scale)
    rng = np.random.default_rng(0)
    sessions = {d: DeviceSession(ann, d) for d in cohort}
    inbox: list[tuple[str, bytes]] = []
    qsum = np.zeros(dim, dtype=np.uint64)
    dev_cpu = dict.fromkeys(STAGES, 0.0)  # the devices' session calls, uncontended (not in the hub's profile)
    for d, s in sessions.items():
        t0 = time.thread_time()
        inbox += [(d, f) for f in s.start()]
        t1 = time.thread_time()
        q = quantise(rng.standard_normal(dim) * 1e-3, s.setup.config)
        qsum += q
        inbox += [(d, f) for f in s.set_input(q)]
        dev_cpu["advertise"] += t1 - t0
        dev_cpu["masked"] += time.thread_time() - t1
    prof = cProfile.Profile()
    per_stage: dict[str, float] = {}
    result: SecureSum | None = None
    while result is None:
        if not inbox:
            if not outbox:
                raise RuntimeError(f"profiled round stuck in stage {coord.stage}")
            for d, f in outbox:  # deliver the hub's frames (device work is not profiled)
                msg = decode(f)
                assert isinstance(msg, SecAggStage)
                stage = {"share": "share", "mask": "masked", "unmask": "unmask"}[coord.stage]
                t0 = time.thread_time()
                inbox += [(d, g) for g in sessions[d].on_frame(msg)]
                dev_cpu[stage] += time.thread_time() - t0
            outbox.clear()
            continue
        device, payload = inbox.pop(0)
        stage = coord.stage
        t0 = time.perf_counter()
        if profiled:
            prof.enable()
        msg = decode(payload, max_bytes=1 << 26)  # the hub worker's handle_frame: decode, receive, step
        assert isinstance(msg, SecAggStage)
        coord.receive(device, msg)
        result = coord.step(0.0, set())
        if profiled:
            prof.disable()
        per_stage[stage] = per_stage.get(stage, 0.0) + time.perf_counter() - t0
    exact = bool(np.array_equal(result.result.total, qsum & coord.setup.mask))
    plain = {f"hub_s_{k}_{n}_in_process": round(v, 4) for k, v in per_stage.items()}
    plain[f"hub_s_{n}_in_process"] = round(sum(per_stage.values()), 4)
    if not profiled:
        return {**plain, **{f"device_cpu_s_{k}_{n}_in_process": round(v / n, 6) for k, v in dev_cpu.items()},
                "secagg_sum_exact": exact}
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    rows = []
    for (file, line, func), (_cc, ncalls, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((tt, ct, ncalls, f"{Path(file).name}:{line}:{func}"))
    rows.sort(reverse=True)
    return {
        f"hub_profile_s_{n}": round(sum(per_stage.values()), 4),
        **{f"hub_profile_s_{k}_{n}": round(v, 4) for k, v in per_stage.items()},
        f"hub_profile_top_{n}": [f"{name} tottime {tt:.3f} s cumtime {ct:.3f} s calls {nc}"
                                 for tt, ct, nc, name in rows[:top]],
        **{f"device_cpu_s_{k}_{n}_in_process": round(v / n, 6) for k, v in dev_cpu.items()},
        "secagg_sum_exact": exact, f"secagg_degree_{n}": plan.degree, f"secagg_threshold_{n}": plan.threshold,
    }


# -- distributed DP vs central DP at equal epsilon -------------------------------------------------------------------
def bench_dp(rounds: int) -> dict[str, Any]:
    from bench.privacy_utility import LOCAL_EPOCHS, LR, PROXIMAL_LAMBDA, SEED, _final, _settings
    from fedge.core.aggregators import Bounds, SecureSumAggregator
    from fedge.core.privacy import (
        DpEvent,
        DpParams,
        distributed_min_cohort,
        epsilon,
        event_for,
        noise_for_epsilon,
    )
    from fedge.core.rounds import poisson_select
    from fedge.core.secagg import RoundSetup, SecAggConfig, dequantise
    from fedge.core.secagg_round import split_flat
    from fedge.core.secagg_session import auto_clip, private_input
    from fedge.core.training import fit
    from fedge.demo import DemoPaths, prepare
    from fedge.simulate import device_noise_rng, load_fleet, resolve_dp, run_rounds, train_rng

    out: dict[str, Any] = {"dp_rounds": rounds, "dp_epsilon": DP_EPS, "dp_min_devices": MIN_COHORT,
                           "dp_dropout_allowance": DROPOUT_ALLOWANCE}
    paths = DemoPaths((ROOT / ".fedge" / "bench" / "privacy_utility").resolve())
    t0 = time.perf_counter()
    prepare(paths, 1, SEED, quiet=True)
    fleet = load_fleet(paths, DP_DEVICES, SEED)
    say(f"DP fleet ready in {time.perf_counter() - t0:.1f} s; central DP runs")
    for amplified in (True, False):
        dp = resolve_dp("central", noise_multiplier=None, target_epsilon=DP_EPS, clip=DP_CLIP, sample_rate=DP_Q,
                        delta=DP_DELTA, rounds=rounds, amplification=amplified)
        assert dp is not None
        res = run_rounds(fleet, _settings(rounds, dp=dp, target_epsilon=DP_EPS, amplification=amplified))
        tag = "" if amplified else "_unamplified"
        out[f"accuracy_central_eps8{tag}"] = round(_final(res), 4)
        out[f"noise_multiplier_central{tag}"] = round(dp.noise_multiplier, 4)
        out[f"epsilon_spent_central{tag}"] = round(res.results[-1].epsilon or 0.0, 4)

    # distributed: z for the unamplified event DpEvent(z), every round counted
    z = noise_for_epsilon(DP_EPS, DP_DELTA, rounds, 1.0, amplified=False)
    event = event_for(DpParams("distributed", z, DP_CLIP, DP_Q), trust_sampling=True)
    assert event == DpEvent(z)
    w0 = fleet.w0
    shapes = {k: tuple(v.shape) for k, v in w0.items()}
    names = sorted(w0)
    index = {name: i for i, name in enumerate(fleet.names)}
    head = {k: np.asarray(v, dtype=np.float32).copy() for k, v in w0.items()}
    spent: list[DpEvent] = []
    skipped = 0
    cohorts: list[int] = []
    ms: list[int] = []
    cfg = SecAggConfig()
    t0 = time.perf_counter()
    for rid in range(1, rounds + 1):
        selected = poisson_select(fleet.names, DP_Q, SEED, rid)  # the cohorts of the central runs
        if len(selected) < MIN_COHORT:  # the hub announces nothing: no privacy spent, no model
            skipped += 1
            continue
        spent.append(event)
        cohorts.append(len(selected))
        # as the hub announces it: the noise split over nearly the whole cohort, the coordinate clip above it
        m = distributed_min_cohort(len(selected), MIN_COHORT, DROPOUT_ALLOWANCE)
        ms.append(m)
        dp = DpParams("distributed", z, DP_CLIP, DP_Q, min_cohort=m)
        cfg = SecAggConfig(clip=auto_clip(dp, 1.0))
        setup = RoundSetup(f"dp:{rid}", selected, bytes(32), cfg)
        total = np.zeros(sum(math.prod(s) for s in shapes.values()), dtype=np.uint64)
        for name in selected:
            i = index[name]
            fleet.trainer.set_head(head)
            fit(fleet.trainer, fleet.feats[i], fleet.labels[i], LOCAL_EPOCHS, LR, train_rng(SEED, i, rid))
            trained = fleet.trainer.get_head()
            delta = {k: (np.asarray(trained[k], dtype=np.float32) - head[k]).astype(np.float32) for k in head}
            total += private_input(delta, names, setup, dp, device_noise_rng(SEED, i, rid))  # wraps mod 2^64
        agg = SecureSumAggregator(shapes, PROXIMAL_LAMBDA, Bounds(), max(DP_Q * fleet.devices, 1.0))
        agg.add_sum(split_flat(dequantise(total & setup.mask, cfg), shapes), len(selected))
        candidate = agg.result(head, w0)
        if all(np.isfinite(a).all() for a in candidate.values()):
            head = candidate
    _loss, acc = fleet.score(head)
    out.update(accuracy_distributed_eps8=round(acc, 4), noise_multiplier_distributed=round(z, 4),
               epsilon_spent_distributed=round(epsilon(spent, DP_DELTA), 4), distributed_rounds_skipped=skipped,
               distributed_mean_cohort=round(statistics.mean(cohorts), 1),
               distributed_noise_std_in_sum_over_zc=round(
                   statistics.mean(math.sqrt(c / (m - 1)) for c, m in zip(cohorts, ms, strict=True)), 3),
               distributed_coordinate_clip=round(cfg.clip, 4), distributed_scale=cfg.scale,
               distributed_ring_bits=cfg.ring_bits, distributed_s=round(time.perf_counter() - t0, 2),
               source_accuracy=round(fleet.source_accuracy, 4))
    # the target: against central as the hub accounts it by default (not amplified, as distributed never is)
    out["distributed_minus_central_points"] = round((acc - out["accuracy_central_eps8_unamplified"]) * 100, 2)
    out["distributed_minus_central_amplified_points"] = round((acc - out["accuracy_central_eps8"]) * 100, 2)
    return out


# -- main --------------------------------------------------------------------------------------------------------
def _raise_nofile(want: int = 8192) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))  # children (mosquitto) inherit it
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds per scenario (after one warm-up)")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="cohort sizes")
    p.add_argument("--dp-rounds", type=int, default=50, help="rounds of the DP comparison (privacy_utility's 50)")
    p.add_argument("--skip-dp", action="store_true", help="no DP comparison")
    p.add_argument("--skip-mqtt", action="store_true", help="no MQTT rounds")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    t_start = time.perf_counter()
    out: dict[str, Any] = {"bench": "bench/secagg.py", "sizes": sizes, "rounds": args.rounds,
                           "nofile_limit": _raise_nofile(), "loadavg_1m_start": round(os.getloadavg()[0], 2)}
    work = Path(tempfile.mkdtemp(prefix="fedge-bench-secagg-"))
    broker = None
    try:
        from fedge.export.testing import export_small
        from fedge.hub.mosquitto import Mosquitto
        from fedge.protocol.manifest import load_manifest

        say("exporting a small cnn28 (export_small)")
        export_small(work / "artifacts", "cnn28", seed=0)
        head = {q.name: list(q.shape) for q in load_manifest(work / "artifacts").head}
        dim = sum(math.prod(s) for s in head.values())
        out["head_params"] = dim
        say(f"hub side of one n={max(sizes)} round, in process (then again under cProfile)")
        out.update(profile_hub(max(sizes), dim, profiled=False))
        exact = out["secagg_sum_exact"]
        out.update({k: v for k, v in profile_hub(max(sizes), dim).items() if not k.startswith("device_")})
        out["secagg_sum_exact"] = exact and out["secagg_sum_exact"]
        if not args.skip_mqtt:
            broker = Mosquitto(work / "mosquitto", persistence=False).start()
            say(f"mosquitto on :{broker.port}")
            for n in sizes:
                for secagg in (False, True):
                    assert broker.proc is not None
                    out.update(bench_scenario(work, broker.url, broker.port, work / "artifacts", json.dumps(head), n,
                                              secagg, args.rounds, broker.proc.pid))
                out[f"secagg_overhead_s_{n}"] = round(out[f"secagg_round_s_{n}"] - out[f"plain_round_s_{n}"], 4)
            lo = min(sizes)
            for n in sizes[1:]:
                out[f"device_bytes_{n}_over_{lo}"] = round(out[f"device_bytes_total_{n}"]
                                                            / out[f"device_bytes_total_{lo}"], 3)
        if not args.skip_dp:
            say("distributed vs central DP at epsilon 8")
            out.update(bench_dp(args.dp_rounds))
    finally:
        if broker is not None:
            broker.stop()
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    out["bench_s"] = round(time.perf_counter() - t_start, 1)
    out["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    return finish(out, SECAGG, args.json)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "sim":
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        sys.exit(sim_entry(sys.argv[2:]))
    sys.exit(main())
