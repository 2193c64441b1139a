"""A real fleet for end-to-end tests: a hub process and agent processes over a real broker.

``Fleet`` writes ``hub.toml`` and one ``agent.toml`` per device, starts/stops/kills the
processes (logs to files under the test's tmp dir), and keeps a *watcher* (an
``MqttTransport``) that records everything the hub says: round announces, results, model heads,
acks, rejects and presences. Every process is killed in :meth:`Fleet.close`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedge.protocol.codec import decode
from fedge.protocol.errors import DecodeError, FedgeError
from fedge.protocol.messages import Ack, Message, ModelHead, Presence, Reject, RoundAnnounce, RoundResult
from fedge.protocol.mqtt_config import BrokerConfig
from fedge.protocol.tomlfile import write_toml
from fedge.protocol.topics import Topics
from fedge.protocol.transport_mqtt import MqttTransport

__all__ = ["FLEET", "Fleet", "FleetData"]

FLEET = "e2e"
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class FleetData:
    """Session-wide inputs: exported artifacts, one non-IID shard per device, the hub's eval set."""

    artifacts: Path
    shards: tuple[Path, ...]
    shard_sizes: tuple[int, ...]
    eval_file: Path

    @property
    def train_total(self) -> int:
        """Samples the devices train on: each holds out round(0.2 n) for validation (agent default)."""
        return sum(n - round(0.2 * n) for n in self.shard_sizes)


@dataclass
class Proc:
    name: str
    args: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)  # on top of this process's environment

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3", **self.env}
        with self.log.open("ab") as fh:
            fh.write(f"\n==== start {time.strftime('%H:%M:%S')} {' '.join(self.args)}\n".encode())
            fh.flush()
            self.popen = subprocess.Popen(self.args, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int | None:
        """Send ``sig`` and wait; SIGKILL if it does not exit in time. Returns the exit code."""
        p = self.popen
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return p.returncode


@dataclass
class Seen:
    """What the watcher received, in arrival order."""

    announces: list[RoundAnnounce] = field(default_factory=list)
    results: dict[int, RoundResult] = field(default_factory=dict)  # the operators' copy (control/round/result)
    device_results: dict[int, RoundResult] = field(default_factory=dict)  # what devices read (round/result)
    full: set[int] = field(default_factory=set)  # rounds whose operators' copy arrived
    heads: list[ModelHead] = field(default_factory=list)
    acks: list[Ack] = field(default_factory=list)
    rejects: list[tuple[str, Reject]] = field(default_factory=list)  # (topic, reject)
    online: set[str] = field(default_factory=set)
    models: dict[str, str | None] = field(default_factory=dict)  # device -> model version in its presence
    hub_online: bool = False


class Fleet:
    """Hub + agents + watcher over one broker; see the module docstring."""

    def __init__(self, root: Path, data: FleetData, broker_url: str, *, n_agents: int = 5,
                 embedded_port: int | None = None, accounts: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.root = root
        self.data = data
        self.broker_url = broker_url
        self.accounts = accounts or {}  # [broker] tables by account ("hub": the hub and the test's clients; devices)
        self.embedded_port = embedded_port
        self.topics = Topics(FLEET)
        self.devices = [f"device-{i:02d}" for i in range(n_agents)]
        self.hub_toml = root / "hub.toml"
        self.state_dir = root / "hub-state"
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        hub_cmd = [sys.executable, "-m", "fedge.cli", "hub", "serve", "--config", str(self.hub_toml)]
        self.hub = Proc("hub", hub_cmd, self.logs / "hub.log")
        self.agents: dict[str, Proc] = {}
        for i, dev in enumerate(self.devices):
            cfg = root / "agents" / f"{dev}.toml"
            cfg.parent.mkdir(parents=True, exist_ok=True)
            write_toml(cfg, {"device_id": dev, "fleet": FLEET, "data": data.shards[i % len(data.shards)],
                             "state_dir": root / "agents" / dev, "backend": "auto", "seed": i,
                             "broker": self.broker_table(dev)})
            self.agents[dev] = Proc(dev, [sys.executable, "-m", "fedge.edge_agent", "run", "--config", str(cfg)],
                                    self.logs / f"{dev}.log")
        self.seen = Seen()
        self.cond = threading.Condition()
        self.watcher: MqttTransport | None = None
        self._transports: list[MqttTransport] = []

    # -- configuration ----------------------------------------------------------------------------
    def broker_table(self, account: str) -> dict[str, Any]:
        """The ``[broker]`` table of ``account`` (a device id or "hub"): its login from ``accounts``, else the URL."""
        return dict(self.accounts.get(account, {"url": self.broker_url}))

    def set_agent_config(self, dev: str, **tables: Any) -> None:
        """Add or replace top-level keys/tables of one agent's agent.toml (before it starts)."""
        import tomllib

        cfg = self.root / "agents" / f"{dev}.toml"
        table = tomllib.loads(cfg.read_text())
        table.update(tables)
        write_toml(cfg, table)

    def write_hub_toml(self, *, devices: Iterable[str] | None = None, eval_data: bool = True,
                       **sections: Mapping[str, Any]) -> None:
        broker: dict[str, Any] = self.broker_table("hub")
        if self.embedded_port is not None:
            broker = {"url": "embedded", "embedded_host": "127.0.0.1", "embedded_port": self.embedded_port}
        rounds = {"min_devices": len(self.devices), "deadline_s": 60.0, "fraction": 1.0, "local_epochs": 5,
                  "lr": 0.5, "seed": 0}
        rounds.update(sections.get("rounds", {}))
        tables: dict[str, Mapping[str, Any]] = {"broker": broker, "rounds": rounds}
        tables.update({k: v for k, v in sections.items() if k != "rounds"})
        top = {"fleet": FLEET, "state_dir": self.state_dir, "artifacts": self.data.artifacts,
               "eval_data": self.data.eval_file if eval_data else None,
               "devices": None if devices is None else list(devices)}
        write_toml(self.hub_toml, {**top, **tables})

    # -- processes --------------------------------------------------------------------------------
    def start_hub(self, timeout_s: float = 60.0) -> None:
        """Start the hub process and wait until its retained status says online (connects the watcher)."""
        with self.cond:
            self.seen.hub_online = False
        self.hub.start()
        self.connect_watcher(timeout_s)
        self.wait_for(lambda s: s.hub_online, timeout_s, "the hub to publish HubStatus online")

    def start_agents(self, devices: Iterable[str] | None = None, timeout_s: float = 60.0, *,
                     ready: bool = False) -> None:
        """Start agent processes and wait for their presence online (``ready``: holding a model too)."""
        devs = list(self.devices if devices is None else devices)
        for dev in devs:
            self.agents[dev].start()

        def up(s: Seen) -> bool:
            return set(devs) <= s.online and (not ready or all(s.models.get(d) for d in devs))

        self.wait_for(up, timeout_s, f"agents {devs} online{' with a model' if ready else ''}")

    def stop_agent(self, dev: str) -> None:
        self.agents[dev].stop(signal.SIGTERM)
        self.wait_for(lambda s: dev not in s.online, 20, f"{dev} offline")

    def kill_hub(self) -> None:
        self.hub.stop(signal.SIGKILL)

    def close(self) -> None:
        for t in self._transports:
            with contextlib.suppress(Exception):  # teardown must go on
                t.close(flush_timeout_s=1)
        procs = [*self.agents.values(), self.hub]
        for proc in procs:  # signal everyone first, then wait: agents stop in parallel
            if proc.alive:
                assert proc.popen is not None
                proc.popen.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.stop(signal.SIGTERM, timeout_s=10)

    def logs_text(self, tail: int = 6000) -> str:
        parts = []
        for log in sorted(self.logs.glob("*.log")):
            parts.append(f"----- {log.name} -----\n{log.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    # -- the watcher ------------------------------------------------------------------------------
    def transport(self, name: str, timeout_s: float = 60.0) -> MqttTransport:
        """A connected MqttTransport of the test (retried while an embedded broker is starting)."""
        # a "watcher" account when given: with use_username_as_clientid the hub's own login would knock the hub off
        account = "watcher" if "watcher" in self.accounts else "hub"
        t = MqttTransport(BrokerConfig.from_mapping(self.broker_table(account)),
                          f"{name}-{os.getpid()}-{time.monotonic_ns()}", session_expiry_s=0)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                t.connect(timeout_s=2)
                break
            except FedgeError:
                if time.monotonic() > deadline:
                    raise
                if self.embedded_port is not None and not self.hub.alive:
                    raise AssertionError(f"the hub died before its broker came up\n{self.logs_text()}") from None
                time.sleep(0.3)
        self._transports.append(t)
        return t

    def connect_watcher(self, timeout_s: float = 60.0) -> None:
        if self.watcher is not None:
            if self.watcher.connected.wait(timeout_s):
                return
            raise AssertionError("the watcher did not reconnect")
        t = self.watcher = self.transport("watcher", timeout_s)
        tp = self.topics
        t.subscribe(tp.hub_status, self._recorder(lambda s, m: setattr(s, "hub_online", bool(m.online))))
        t.subscribe(tp.presence_all, self._recorder(self._on_presence))
        t.subscribe(tp.announce, self._recorder(lambda s, m: s.announces.append(m)))
        # the full result (cohort, samples) goes to operators; round/result, which devices read, has neither (a
        # selection round's result is only there)
        t.subscribe(tp.control_round_result, self._recorder(self._on_full_result))
        t.subscribe(tp.result, self._recorder(self._on_device_result))
        t.subscribe(tp.model_head, self._recorder(lambda s, m: s.heads.append(m)))
        t.subscribe(f"{tp.base}/device/+/ack", self._recorder(lambda s, m: s.acks.append(m)))
        t.subscribe(f"{tp.base}/device/+/reject", self._recorder(lambda s, m: None, keep_topic=True))

    @staticmethod
    def _on_full_result(s: Seen, m: Message) -> None:
        assert isinstance(m, RoundResult)
        s.results[m.round] = m
        s.full.add(m.round)

    @staticmethod
    def _on_device_result(s: Seen, m: Message) -> None:
        assert isinstance(m, RoundResult)
        s.device_results[m.round] = m
        if m.round not in s.full:
            s.results[m.round] = m

    @staticmethod
    def _on_presence(s: Seen, m: Message) -> None:
        assert isinstance(m, Presence)
        (s.online.add if m.online else s.online.discard)(m.device)
        s.models[m.device] = m.model_version

    def _recorder(self, fn: Callable[[Seen, Any], None], keep_topic: bool = False) -> Callable[[str, bytes], None]:
        def handle(topic: str, payload: bytes) -> None:
            if not payload:
                return
            try:
                msg = decode(payload)
            except DecodeError:  # hostile tests publish garbage on the hub's topics: not the hub's words
                return
            with self.cond:
                if keep_topic:
                    assert isinstance(msg, Reject)
                    self.seen.rejects.append((topic, msg))
                else:
                    fn(self.seen, msg)
                self.cond.notify_all()

        return handle

    def wait_for(self, pred: Callable[[Seen], bool], timeout_s: float, what: str) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: pred(self.seen), timeout_s):
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")

    def wait_results(self, rounds: Iterable[int], timeout_s: float = 90.0) -> list[RoundResult]:
        want = list(rounds)
        self.wait_for(lambda s: all(r in s.results for r in want), timeout_s, f"RoundResult of rounds {want}")
        with self.cond:
            return [self.seen.results[r] for r in want]

    def announce_of(self, rnd: int, timeout_s: float = 30.0) -> RoundAnnounce:
        self.wait_for(lambda s: any(a.round == rnd for a in s.announces), timeout_s, f"announce of round {rnd}")
        with self.cond:
            return next(a for a in self.seen.announces if a.round == rnd)

    def start_round(self, payload: bytes = b"{}") -> None:
        assert self.watcher is not None
        self.watcher.publish(self.topics.control_round_start, payload, qos=1)

    def retained(self, topic: str, timeout_s: float = 10.0) -> Message:
        """A late subscriber's view: the retained message on ``topic``."""
        got: list[Message] = []
        ev = threading.Event()

        def on(_t: str, payload: bytes) -> None:
            if payload:
                got.append(decode(payload))
                ev.set()

        t = self.transport("late")
        try:
            t.subscribe(topic, on)
            if not ev.wait(timeout_s):
                raise AssertionError(f"no retained message on {topic}")
            return got[0]
        finally:
            t.close(flush_timeout_s=1)
            self._transports.remove(t)

    def hub_sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of ``query`` on the hub's SQLite store, opened read-only (works while the hub runs)."""
        import sqlite3

        db = sqlite3.connect(f"file:{self.state_dir / 'hub.sqlite'}?mode=ro", uri=True, timeout=10)
        try:
            return db.execute(query, params).fetchall()
        finally:
            db.close()

    def hub_cli(self, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fedge.cli", *args, "--config", str(self.hub_toml)],
                              capture_output=True, text=True, timeout=timeout_s, cwd=ROOT,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
