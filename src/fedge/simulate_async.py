"""Synchronous rounds against buffered asynchronous aggregation, on a fleet whose devices come and go.

Simulated time, real training: every device's update is the round core's (:func:`fedge.core.device.train`) on its
real data, from the version it started on. Devices are online a share of the time (alternating exponential online
and offline spells), and each training job takes a heavy-tailed time (a per-device speed times a log-normal draw);
a device that goes offline before its job ends loses it. Both modes see the same availability and job times.

* **Synchronous** (what a round does with the hub's defaults): select ``ceil(k (1 + over_select))`` of the devices
  online now; close once ``round_target`` of them sent an update and the others had their straggler grace, or when
  each has finished or gone offline (or the deadline); aggregate (FedAvg, bounded), start the next round.
* **Buffered** (:mod:`fedge.core.buffered`): every online device trains on the latest version it can get, once per
  version (as the agent does: a device that sent an update on version ``v`` trains again once a newer version is
  out, and not on a version that was already out when its update went out; a version is made from ``k`` distinct
  devices' updates, as the hub requires); the hub folds each finished update into a buffer with its staleness
  weight and makes a new version every ``k`` updates.

In both modes the hub's held-out deploy gate decides (as the hub does by default): a new version that scores more
than ``deploy_tolerance`` below the deployed one on the gate's rows is held back, and devices go on training the
deployed one; in buffered mode, as on the hub (its ``buffer_attempt``), the devices whose updates made a held-back
version may train on the deployed one again (the attempt shuffles their data differently). The hub's eval set is
split in two (:class:`HeldOut`): the gate's rows and the measurement rows, on which every deployed version is
scored, so the gate's choices are not measured on the rows that made them.
:func:`time_to_target` reads when a run reached an accuracy and stayed near it.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field, replace

import numpy as np

from fedge.core import device as core
from fedge.core.aggregators import Aggregator, Bounds
from fedge.core.buffered import Buffer, BufferSettings
from fedge.core.losses import score
from fedge.core.stragglers import round_target, straggler_grace
from fedge.core.strategy import GateSettings, held_out_verdict
from fedge.protocol.messages import RoundAnnounce
from fedge.protocol.types import Head
from fedge.simulate_fleet import SimFleet, device_seed

__all__ = ["AsyncSettings", "Availability", "HeldOut", "Jobs", "Trace", "run_buffered", "run_sync", "time_to_target"]


@dataclass(frozen=True)
class AsyncSettings:
    """``online_share`` of the time each device is online (spells of mean ``online_mean`` time units);
    training jobs take ``speed × lognormal(0, job_sigma)`` (speed ``lognormal(0, speed_sigma)`` per device);
    ``k`` devices per synchronous round (over-selected by ``over_select``, the hub's default) and updates per
    buffered version; ``deadline`` caps a round;
    ``rounds`` synchronous rounds set the time budget both modes get; ``deploy_tolerance``: the held-out gate's
    (None: no gate, every version is deployed)."""

    online_share: float = 0.3
    online_mean: float = 10.0
    job_sigma: float = 1.0
    speed_sigma: float = 0.5
    k: int = 10
    max_staleness: int = 20
    deadline: float = 60.0
    over_select: float = 0.25
    server_lr: float = 1.0
    rounds: int = 20
    local_epochs: int = 2
    lr: float = 0.05
    seed: int = 0
    deploy_tolerance: float | None = 0.01


class Availability:
    """When each device is online: alternating exponential spells, the first state drawn with ``online_share``."""

    def __init__(self, devices: int, settings: AsyncSettings, horizon: float) -> None:
        rng = np.random.default_rng([settings.seed, 0xA5A1])
        off_mean = settings.online_mean * (1 - settings.online_share) / settings.online_share
        self.spells: list[list[tuple[float, float]]] = []
        for _ in range(devices):
            t, online, spells = 0.0, rng.random() < settings.online_share, []
            while t < horizon:
                length = rng.exponential(settings.online_mean if online else off_mean)
                if online:
                    spells.append((t, t + length))
                t += length
                online = not online
            self.spells.append(spells)

    def online_until(self, device: int, t: float) -> float | None:
        """The end of the online spell ``device`` is in at ``t`` (None: offline at ``t``)."""
        for start, end in self.spells[device]:
            if start <= t < end:
                return end
        return None

    def next_online(self, device: int, t: float) -> float | None:
        """When ``device`` next comes online after ``t`` (None: never within the horizon)."""
        return next((start for start, _ in self.spells[device] if start > t), None)


@dataclass
class Trace:
    """A run: (simulated time, measured accuracy) of each deployed version, the devices whose updates made each
    version (deployed or held back, in order), the updates it used, the jobs lost to devices going offline, and the
    versions the gate held back; ``refused``: buffered updates refused because the device already had one in the
    buffer (trained on an older version, then again on a newer one before the buffer filled)."""

    points: list[tuple[float, float]] = field(default_factory=list)
    made: list[tuple[int, ...]] = field(default_factory=list)
    updates: int = 0
    lost_jobs: int = 0
    held_back: int = 0
    refused: int = 0
    end: float = 0.0


class Jobs:
    """Every device's job durations, in order: its speed times log-normal draws from its own Generator, so the
    j-th job of device i takes the same time in both modes."""

    def __init__(self, devices: int, settings: AsyncSettings) -> None:
        rng = np.random.default_rng([settings.seed, 0xA5A2])
        self.speed = rng.lognormal(0.0, settings.speed_sigma, devices)
        self._draws = [np.random.default_rng([settings.seed, 0xA5A3, i]) for i in range(devices)]
        self.sigma = settings.job_sigma

    def next(self, device: int) -> float:
        return float(self.speed[device] * self._draws[device].lognormal(0.0, self.sigma))


class HeldOut:
    """The hub's eval set split in two halves (seeded): the deploy gate's rows and the measurement rows."""

    def __init__(self, fleet: SimFleet, seed: int = 0) -> None:
        from fedge.protocol.manifest import load_manifest
        from fedge.runtime.data import load_local

        manifest = load_manifest(fleet.paths.artifacts)
        data = load_local(fleet.paths.data / "eval.npz", manifest.input.shape, manifest.input.layout)
        self._trainer = fleet.trainer
        self._features = fleet.trainer.features(data.x)
        self._y = data.y
        order = np.random.default_rng([seed, 0xA5A5]).permutation(len(data.y))
        self.measure, self.gate = np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2:])

    def accuracy(self, head: Head, rows: np.ndarray) -> float:
        self._trainer.set_head(dict(head))
        return float(score(self._trainer.logits(self._features[rows]), self._y[rows]).accuracy)


class _Deployment:
    """The deployed version, gated on :class:`HeldOut`'s gate rows; the trace records each deployed version's
    measured accuracy."""

    def __init__(self, head: Head, held_out: HeldOut, tolerance: float | None, trace: Trace) -> None:
        self.gates = GateSettings(held_out=tolerance is not None, tolerance=tolerance or 0.0)
        self.held_out, self.trace, self.head = held_out, trace, head
        self.gate_accuracy = held_out.accuracy(head, held_out.gate)
        trace.points.append((0.0, held_out.accuracy(head, held_out.measure)))

    def offer(self, head: Head, t: float) -> bool:
        """Deploy ``head`` at ``t`` unless the gate holds it back (False)."""
        acc = self.held_out.accuracy(head, self.held_out.gate)
        if held_out_verdict(self.gates, acc, self.gate_accuracy) is not None:
            self.trace.held_back += 1
            return False
        self.head, self.gate_accuracy = head, acc
        self.trace.points.append((t, self.held_out.accuracy(head, self.held_out.measure)))
        return True


def _update(fleet: SimFleet, i: int, head: Head, version: int, settings: AsyncSettings,
            attempt: int | None = None) -> tuple[Head, int] | None:
    """Device ``i``'s update from ``head`` (version ``version``): the round core's device round. ``attempt``: a
    buffered round's (its announce carries ``buffer_k`` and ``buffer_attempt``, so a retry shuffles differently)."""
    msg = RoundAnnounce("async", version + 1, f"v{version}", fleet.backbone_sha256, 1e18, 1, (fleet.names[i],),
                        settings.local_epochs, settings.lr)
    if attempt is not None:
        msg = replace(msg, buffer_k=settings.k, max_staleness=settings.max_staleness, buffer_attempt=attempt)
    policy = core.DevicePolicy(device_seed(settings.seed, i), validation_fraction=0.0,
                               personalization=core.Personalization.FINETUNE)
    out = core.train(msg, fleet.trainer, core.DeviceData(fleet.feats[i], fleet.labels[i], fleet.keys[i]),
                     core.RoundHeads(head, fleet.w0), policy, private=False)
    if not isinstance(out, core.Trained):
        return None
    return out.delta, out.n_samples


def run_sync(fleet: SimFleet, settings: AsyncSettings, availability: Availability, held_out: HeldOut) -> Trace:
    """``settings.rounds`` synchronous rounds as the hub runs them by default: ``ceil(k (1 + over_select))`` of the
    devices online at the start are selected; the round closes once ``round_target`` of them sent an update and the
    others had their straggler grace (:mod:`fedge.core.stragglers`), or when it knows about every selected device
    (finished, gone offline, or the deadline)."""
    jobs = Jobs(fleet.devices, settings)
    rng = np.random.default_rng([settings.seed, 0xA5A4])
    shapes = {k: tuple(v.shape) for k, v in fleet.w0.items()}
    t, trace = 0.0, Trace()
    deployed = _Deployment(dict(fleet.w0), held_out, settings.deploy_tolerance, trace)
    for r in range(settings.rounds):
        online = [i for i in range(fleet.devices) if availability.online_until(i, t) is not None]
        while not online:  # nobody to ask: wait for the next device to come online
            t = min((x for i in range(fleet.devices) if (x := availability.next_online(i, t)) is not None),
                    default=math.inf)
            if not math.isfinite(t):
                trace.end = t
                return trace
            online = [i for i in range(fleet.devices) if availability.online_until(i, t) is not None]
        want = math.ceil(settings.k * (1 + settings.over_select))  # the hub's over-selection
        cohort = sorted(rng.choice(online, size=min(want, len(online)), replace=False).tolist())
        target = round_target(len(cohort), 1, settings.over_select)
        done: list[tuple[float, int]] = []  # (finish, device) of the jobs that finished online, in time
        last = t  # when the round knows about every selected device (finished, offline, or the deadline)
        for i in cohort:
            finish = t + jobs.next(i)
            until = availability.online_until(i, t) or t
            if finish <= min(until, t + settings.deadline):
                done.append((finish, i))
                last = max(last, finish)
            else:  # offline before it finished (or past the deadline): the round waits until it knows
                trace.lost_jobs += 1
                last = max(last, min(until, t + settings.deadline))
        done.sort()
        close = last
        if target and len(done) >= target:  # over-selection: the target, then the others' straggler grace
            reached = done[target - 1][0]
            close = min(last, reached + straggler_grace(t, reached))
        agg = Aggregator(shapes, 0.0, Bounds())
        senders = []
        for finish, i in done:
            if finish > close:  # a straggler the round did not wait for
                trace.lost_jobs += 1
                continue
            update = _update(fleet, i, deployed.head, r, settings)
            if update is not None:
                agg.add(*update)
                senders.append(i)
                trace.updates += 1
        t = close
        if agg.count:
            trace.made.append(tuple(senders))
            deployed.offer(agg.result(deployed.head, fleet.w0), t)
    trace.end = t
    return trace


def run_buffered(fleet: SimFleet, settings: AsyncSettings, availability: Availability, held_out: HeldOut,
                 horizon: float) -> Trace:
    """Buffered aggregation until ``horizon``: every online device trains on the latest deployed version, once per
    version (and, as the agent does, not on the version that was out when its update went out: only on a later one);
    ``k`` updates make a version, deployed unless the held-out gate keeps it back. A held-back version's devices get
    their turn back (the hub's next ``buffer_attempt``): they train on the deployed version again, with the
    attempt's own shuffling."""
    jobs = Jobs(fleet.devices, settings)
    shapes = {k: tuple(v.shape) for k, v in fleet.w0.items()}
    buffer_settings = BufferSettings(settings.k, settings.max_staleness, settings.server_lr)
    trace = Trace()
    deployed = _Deployment(dict(fleet.w0), held_out, settings.deploy_tolerance, trace)
    versions: list[Head] = [deployed.head]  # the deployed chain (a held-back version is not on it)
    buf, senders = Buffer(shapes, buffer_settings, 0.0, Bounds()), []
    attempt = 0  # the round's buffer_attempt: full buffers that deployed nothing
    trained: dict[int, int] = {}  # device -> the last version it trained on (it trains once per version)
    waiting: set[int] = set()  # devices that trained on the current version: they start again on the next one
    events: list[tuple[float, int, int, int]] = []  # (time, kind 0 = start / 1 = finish, device, base version)

    def start(i: int, t: float) -> None:
        if trained.get(i) == len(versions) - 1:
            waiting.add(i)
            return
        when = t if availability.online_until(i, t) is not None else availability.next_online(i, t)
        if when is not None and when < horizon:
            heapq.heappush(events, (when, 0, i, -1))

    for i in range(fleet.devices):
        start(i, 0.0)
    while events:
        t, kind, i, base = heapq.heappop(events)
        if t >= horizon:
            break
        if kind == 0:  # a device takes the latest version and trains
            if trained.get(i) == len(versions) - 1:  # it trained on this one already (a late start event)
                waiting.add(i)
                continue
            v = len(versions) - 1
            finish = t + jobs.next(i)
            until = availability.online_until(i, t) or t
            if finish <= until:
                trained[i] = v
                heapq.heappush(events, (finish, 1, i, v))
            else:
                trace.lost_jobs += 1
                start(i, until)  # back when it comes online again
            continue
        staleness = len(versions) - 1 - base
        if i in senders:  # the hub refuses a second update of one device for the same version (K distinct devices)
            trace.refused += 1
        elif staleness <= settings.max_staleness:
            update = _update(fleet, i, versions[base], base, settings, attempt)
            if update is not None:
                buf.add(*update, staleness=staleness)
                senders.append(i)
                trace.updates += 1
        if staleness > 0:  # sent when a newer version was out: the agent trains on the one after that (PROTOCOL.md)
            trained[i] = len(versions) - 1
        if buf.full:
            trace.made.append(tuple(senders))
            if deployed.offer(buf.result(versions[-1], fleet.w0), t):
                versions.append(deployed.head)
                for w in sorted(waiting):
                    waiting.discard(w)
                    start(w, t)
            else:  # held back: the next attempt; the version's devices may train on the deployed one again
                attempt += 1
                for w in sorted(senders):
                    trained.pop(w, None)
                    if w in waiting:  # (i, whose update filled the buffer, starts below)
                        waiting.discard(w)
                        start(w, t)
            buf, senders = Buffer(shapes, buffer_settings, 0.0, Bounds()), []
        start(i, t)
    trace.end = horizon
    return trace


def time_to_target(trace: Trace, target: float, slack: float = 0.01) -> float:
    """The first simulated time at which ``trace`` reached ``target`` accuracy *and stayed* within ``slack`` of it
    for the rest of the run (a lucky crossing of a noisy curve does not count; inf: never)."""
    points = trace.points
    for k, (t, acc) in enumerate(points):
        if acc >= target and all(a >= target - slack for _, a in points[k:]):
            return t
    return math.inf
