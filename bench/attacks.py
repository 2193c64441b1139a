"""One legitimately provisioned device attacks a real fleet: what each attack costs the deployed model; ONE JSON object.

``python bench/attacks.py --json``

The fleet is what ``fedge fleet init`` makes, with its defaults (TLS mosquitto from the generated config, dropping to
an unprivileged account when the bench runs as root, one broker account per participant, ACLs, the hub's signing
key, the generated ``hub.toml`` with the hub's round defaults), on loopback: a real mosquitto, the hub process
(``fedge hub serve``), four honest agent processes (``fedge-agent run``, provisioned by ``fedge devices provision
--fleet-dir``) and one hostile device, ``device-04`` (``bench/_attacker.py``: its own provisioned account; trains
honestly with the round core, then attacks). The devices hold the demo task's shards (Fashion-MNIST, rotated
domain, label skew). The demo's held-out set is split: the bench scores every deployed head on one half.

Two passes, each on a fresh fleet. With the **deploy gates** (what the targets check; what issue 20 makes every
fleet's default): the hub gets the other half of the held-out set (``eval_data``: the held-out gate) and
``[aggregation] federated_gate = true``. **Without** (``without_gate``): the generated hub.toml as it is. In each,
``--warmup`` clean rounds make a working model (the *base* version); then each scenario starts from the base
(``fedge hub rollback --to <base>``; an excluded hostile device is readmitted with ``fedge hub devices readmit``)
and runs ``--repeats`` rounds (with the federated gate: each round and its evaluation round), the hostile device
doing one thing:

* plain rounds: ``honest`` (it behaves: the clean round), ``sign_flip``, ``scaled_noise``, ``huge_samples``,
  ``silent``; ``lying_gate`` with ``[aggregation] federated_gate = true`` in both passes;
* SecAgg rounds (``[secagg] enabled = true`` added): ``honest`` (the clean SecAgg round), ``secagg_huge``,
  ``secagg_in_range``, ``garbage_shares``, ``garbage_unmask``, ``withheld_input``.

Figures: ``clean_round_s`` (plain) and ``clean_secagg_round_s`` (median wall time from ``control/round/start`` to
the last result of a clean round); per attack under ``attacks``: ``acc_drop_pts`` (the mean held-out accuracy of the
deployed model after a clean round of its kind minus after the attacked round, points), ``deployed`` (an attacked
round's version became the deployed one), ``round_s`` (the longest), ``status``, ``attacker_in`` (the hostile device
is among a round's contributors as the hub records them) and ``detail``. Targets (the gated pass): every attack
costs at most 2 points or is not deployed (``worst_deployed_drop_pts``); every stalling attack (``silent``,
``garbage_shares``, ``withheld_input``) completes its round without the attacker within 3x a clean round of its
kind + 2 s (``stalls_within_limit``).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._attacker import Attacker  # noqa: E402
from bench._targets import ATTACKS, finish  # noqa: E402

FLEET = "attacks"
HONEST = ("device-00", "device-01", "device-02", "device-03")
HOSTILE = "device-04"
WATCHER = "bench-watcher"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
PLAIN = ("sign_flip", "scaled_noise", "huge_samples", "silent")
SECAGG = ("secagg_huge", "secagg_in_range", "garbage_shares", "garbage_unmask", "withheld_input")
STALLING = ("silent", "garbage_shares", "withheld_input")
MAX_DROP_PTS = 2.0


def say(text: str) -> None:
    print(f"[attacks] {time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


class Watcher:
    """The bench's own broker account (the hub's rights on the fleet's topics): results, heads, replies, presence."""

    def __init__(self, broker: Any) -> None:
        from fedge.protocol.topics import Topics
        from fedge.protocol.transport_mqtt import MqttTransport

        self.topics = t = Topics(FLEET)
        self.cond = threading.Condition()
        self.results: dict[int, Any] = {}
        self.heads: dict[str, dict[str, Any]] = {}
        self.replies: dict[str, dict[str, Any]] = {}
        self.online: set[str] = set()
        self.models: dict[str, str | None] = {}
        self.hub_online = False
        self.transport = MqttTransport(broker, f"{WATCHER}", session_expiry_s=0)
        sub = self.transport.subscribe
        sub(t.result, self._frame(self._on_result))
        sub(t.model_head, self._frame(self._on_head))
        sub(t.hub_status, self._frame(lambda m: setattr(self, "hub_online", bool(m.online))))
        sub(t.presence_all, self._frame(self._on_presence))
        sub(t.control_round_reply, self._on_reply)
        self.transport.connect(timeout_s=20)

    def _frame(self, fn: Any) -> Any:
        from fedge.protocol.codec import decode

        def handle(_topic: str, payload: bytes) -> None:
            if payload:
                msg = decode(payload)
                with self.cond:
                    fn(msg)
                    self.cond.notify_all()

        return handle

    def _on_result(self, m: Any) -> None:
        self.results[m.round] = m

    def _on_head(self, m: Any) -> None:
        self.heads[m.version] = {k: np.asarray(v, dtype=np.float32) for k, v in m.head.items()}

    def _on_presence(self, m: Any) -> None:
        (self.online.add if m.online else self.online.discard)(m.device)
        self.models[m.device] = m.model_version

    def _on_reply(self, _topic: str, payload: bytes) -> None:
        body = json.loads(payload)
        with self.cond:
            self.replies[str(body.get("request_id"))] = body
            self.cond.notify_all()

    def wait(self, pred: Any, timeout_s: float, what: str) -> None:
        with self.cond:
            if not self.cond.wait_for(pred, timeout_s):
                raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")

    def start_round(self) -> int:
        rid = uuid.uuid4().hex[:16]
        self.transport.publish(self.topics.control_round_start, json.dumps({"request_id": rid}).encode(), qos=1)
        self.wait(lambda: rid in self.replies, 30, "the hub's reply")
        reply = self.replies[rid]
        if not reply["accepted"]:
            raise RuntimeError(f"round start refused: {reply}")
        return int(reply["round"])

    def close(self) -> None:
        self.transport.close(flush_timeout_s=1)


class Bench:
    """The fleet folder, the broker, the hub, the agents, the hostile device and the watcher."""

    def __init__(self, work: Path, data: Path, artifacts: Path, eval_file: Path, shards: list[Path],
                 gate: bool = False) -> None:
        from fedge.devices.fleet import add_device, init_fleet, set_password
        from fedge.hub.mosquitto import free_port

        self.work, self.artifacts = work, artifacts
        self.gate = gate
        # the held-out set, split: the hub's (its deploy gate, with --gate) and the bench's own (the figures)
        from fedge.runtime.data import load_local

        held = load_local(eval_file, (28, 28, 1))
        half = len(held.y) // 2
        self.hub_eval, self.eval_file = work / "hub-eval.npz", work / "bench-eval.npz"
        np.savez(self.hub_eval, x=held.x[:half], y=held.y[:half])
        np.savez(self.eval_file, x=held.x[half:], y=held.y[half:])
        self.port = free_port()
        self.dir = init_fleet(FLEET, work / "fleet", broker_host="127.0.0.1", port=self.port, bind="127.0.0.1",
                              artifacts=str(artifacts))
        self.url = f"mqtts://127.0.0.1:{self.port}"
        self.passwords = {WATCHER: secrets.token_urlsafe(16), HOSTILE: secrets.token_urlsafe(16)}
        set_password(self.dir.passwd, WATCHER, self.passwords[WATCHER])
        with self.dir.acl.open("a", encoding="utf-8") as fh:
            fh.write(f"user {WATCHER}\ntopic readwrite fedge/{FLEET}/#\n")
        add_device(self.dir.root, HOSTILE, self.passwords[HOSTILE])
        self.agent_configs = {dev: self._provision(dev, shards[i], i) for i, dev in enumerate(HONEST)}
        self.hostile_data = shards[len(HONEST)]
        self.logs = work / "logs"
        self.logs.mkdir(exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.hub_sections: dict[str, dict[str, Any]] = {}
        self.watcher: Watcher | None = None
        self.attacker: Attacker | None = None
        self.base: str | None = None
        self.data = data

    def _provision(self, dev: str, shard: Path, seed: int) -> Path:
        from fedge.devices.profiles import get_profile
        from fedge.devices.provision import Provisioning, provision
        from fedge.protocol.tomlfile import read_toml, write_toml

        p = Provisioning(dev, FLEET, self.dir.read()["broker_url"], str(shard))
        bundle = provision(p, get_profile("x86-dev"), self.work / "bundles", fleet_dir=self.dir.root)
        cfg = read_toml(bundle / "agent.toml")
        cfg["state_dir"] = str(self.work / "agents" / dev)
        cfg["seed"] = seed
        cfg["broker"]["ca_file"] = str(bundle / cfg["broker"]["ca_file"])
        cfg["hub_public_key"] = str(bundle / cfg["hub_public_key"])
        write_toml(bundle / "agent.toml", cfg)
        return bundle / "agent.toml"

    def broker(self, account: str) -> Any:
        from fedge.protocol.mqtt_config import BrokerConfig

        return BrokerConfig.from_mapping({"url": self.url, "username": account, "password": self.passwords[account],
                                          "ca_file": str(self.dir.ca_cert)})

    # -- processes ----------------------------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str]) -> None:
        log = (self.logs / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)

    def _stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def start(self) -> None:
        from fedge.hub.mosquitto import MOSQUITTO, wait_port

        self._spawn("mosquitto", [MOSQUITTO, "-c", str(self.dir.mosquitto_conf)])
        wait_port("127.0.0.1", self.port)
        self.watcher = Watcher(self.broker(WATCHER))
        self.start_hub()
        for dev, cfg in self.agent_configs.items():
            self._spawn(dev, [sys.executable, "-m", "fedge.edge_agent", "run", "--config", str(cfg)])
        self.attacker = Attacker(HOSTILE, FLEET, self.broker(HOSTILE), self.hostile_data, self.artifacts)
        self.attacker.start()
        w = self.watcher
        w.wait(lambda: set(HONEST) | {HOSTILE} <= w.online and all(w.models.get(d) for d in HONEST), 180,
               "every device online with a model")

    def start_hub(self, **sections: dict[str, Any]) -> None:
        """(Re)start the hub on the generated hub.toml plus ``sections`` (the only settings the bench adds)."""
        from fedge.protocol.tomlfile import read_toml, write_toml

        self._stop("hub")
        if self.watcher is not None:
            with self.watcher.cond:
                self.watcher.hub_online = False
        table = read_toml(self.dir.hub_toml)
        for key in ("aggregation", "secagg", "eval_data"):
            table.pop(key, None)
        if self.gate:  # the deploy gates issue 20 makes the default: held-out data, the devices' federated gate
            table["eval_data"] = str(self.hub_eval)
            sections = {**sections, "aggregation": {"federated_gate": True, **sections.get("aggregation", {})}}
        table.update(sections)
        write_toml(self.dir.hub_toml, table)
        self.hub_sections = sections
        self._spawn("hub", [sys.executable, "-m", "fedge.cli", "hub", "serve", "--config", str(self.dir.hub_toml)])
        assert self.watcher is not None
        self.watcher.wait(lambda: self.watcher is not None and self.watcher.hub_online, 60, "the hub online")

    def close(self) -> None:
        if self.attacker is not None:
            self.attacker.close()
        if self.watcher is not None:
            self.watcher.close()
        for name in [n for n in self.procs if n not in ("hub", "mosquitto")] + ["hub", "mosquitto"]:
            self._stop(name)

    # -- the hub's state ------------------------------------------------------------------------------------------
    def sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        db = sqlite3.connect(f"file:{self.dir.root / 'hub-state' / 'hub.sqlite'}?mode=ro", uri=True, timeout=10)
        try:
            return db.execute(query, params).fetchall()
        finally:
            db.close()

    def current(self) -> str:
        return str(self.sql("SELECT value FROM meta WHERE key = 'current_version'")[0][0])

    def hub_cli(self, *args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "fedge.cli", "hub", *args, "--config", str(self.dir.hub_toml)],
                              capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"fedge hub {' '.join(args)} failed: {proc.stdout}{proc.stderr}")
        return proc.stdout

    def readmit(self) -> None:
        """Readmit the hostile device if the hub excluded it (the operator's command)."""
        try:
            self.hub_cli("devices", "readmit", HOSTILE)
        except RuntimeError as exc:
            if "invalid choice" not in str(exc) and "not excluded" not in str(exc):
                raise

    # -- rounds ---------------------------------------------------------------------------------------------------
    def accuracy(self, version: str) -> float:
        from fedge.runtime.data import load_local
        from fedge.runtime.trainers import open_trainer

        w = self.watcher
        assert w is not None
        w.wait(lambda: version in w.heads, 30, f"model/head {version}")
        if not hasattr(self, "_eval"):
            trainer = open_trainer(self.artifacts, backend="auto")
            data = load_local(self.eval_file, (28, 28, 1))
            self._eval = (trainer, trainer.features(np.asarray(data.x, dtype=np.float32)), np.asarray(data.y))
        trainer, feats, y = self._eval
        trainer.set_head(w.heads[version])
        return float((np.argmax(trainer.logits(feats), axis=1) == y).mean())

    def one_round(self, timeout_s: float = 240.0) -> dict[str, Any]:
        """Start a round and wait for its outcome (its evaluation round's too, with the federated gate)."""
        w = self.watcher
        assert w is not None
        t0 = time.monotonic()
        rid = w.start_round()
        w.wait(lambda: rid in w.results, timeout_s, f"the result of round {rid}")
        result = w.results[rid]
        final = result
        gated = bool(self.hub_sections.get("aggregation", {}).get("federated_gate"))
        if gated and result.model_version is not None and "validate" in (result.detail or ""):
            w.wait(lambda: rid + 1 in w.results, timeout_s, f"the evaluation round {rid + 1}")
            final = w.results[rid + 1]
        seconds = time.monotonic() - t0
        cur = self.current()
        row = self.sql("SELECT devices, status FROM rounds WHERE id = ?", (rid,))
        devices = json.loads(row[0][0] or "[]") if row else []
        secagg = self.sql("SELECT included FROM secagg_sums WHERE round = ?", (rid,))
        if secagg:
            devices = json.loads(secagg[0][0])
        return {"round": rid, "status": str(result.status), "final_status": str(final.status),
                "version": result.model_version, "deployed": result.model_version is not None
                and cur == result.model_version, "current": cur, "round_s": round(seconds, 2),
                "attacker_in": HOSTILE in devices, "detail": " | ".join(
                    d for d in {result.detail or "", final.detail or ""} if d)[:400]}

    def scenario(self, mode: str, repeats: int) -> dict[str, Any]:
        """``repeats`` times: roll back to the base version, set the hostile device's mode, run one round, score what
        is deployed. The mean accuracy (a single round's varies by a few points with which devices made it), whether
        any attacked version was deployed, the longest round."""
        assert self.attacker is not None and self.base is not None
        runs = []
        for _ in range(repeats):
            self.readmit()
            self.hub_cli("rollback", "--to", self.base)
            self.attacker.set_mode(mode)
            time.sleep(0.5)  # its presence (huge_samples claims 10^9 there too) reaches the hub first
            out = self.one_round()
            out["accuracy"] = round(self.accuracy(out["current"]), 4)
            say(f"{mode}: {out}")
            runs.append(out)
        return {"accuracy": round(float(np.mean([r["accuracy"] for r in runs])), 4),
                "deployed": any(r["deployed"] for r in runs), "round_s": max(r["round_s"] for r in runs),
                "round_s_median": float(np.median([r["round_s"] for r in runs])),
                "attacker_in": any(r["attacker_in"] for r in runs),
                "status": sorted({r["final_status"] for r in runs}), "accuracies": [r["accuracy"] for r in runs],
                "detail": [r["detail"] for r in runs if r["detail"]][:2]}


def prepare_data(work: Path) -> tuple[Path, Path, list[Path]]:
    """The demo task (pre-trained and exported once in ``work``), five device shards and the held-out set."""
    from fedge.demo import DemoPaths, prepare

    paths = DemoPaths(work)
    info = prepare(paths, len(HONEST) + 1, 0, quiet=True)
    return paths.artifacts, paths.data / "eval.npz", [Path(f) for f in info["device_files"]]


def one_pass(args: argparse.Namespace, gate: bool) -> dict[str, Any]:
    """Every scenario on a fresh fleet, with the deploy gates or with the generated hub.toml as it is."""
    work_data = Path(args.work)
    artifacts, eval_file, shards = prepare_data(work_data)
    tmp = Path(tempfile.mkdtemp(prefix="fedge-attacks-"))
    tmp.chmod(0o711)  # run as root, the broker drops to an unprivileged user that must reach the fleet folder
    bench = Bench(tmp, work_data, artifacts, eval_file, shards, gate=gate)
    figures: dict[str, Any] = {}
    attacks: dict[str, Any] = {}
    try:
        bench.start()
        say(f"fleet up ({'deploy gates' if gate else 'the generated hub.toml as it is'})")
        for i in range(args.warmup):
            out = bench.one_round()
            say(f"warm-up round {i + 1}: {out['status']}, {out['current']}")
        bench.base = bench.current()
        figures["base_accuracy"] = round(bench.accuracy(bench.base), 4)
        clean = bench.scenario("honest", args.repeats)
        figures["clean_round_s"] = clean["round_s_median"]
        figures["clean_accuracy"] = clean["accuracy"]
        for mode in PLAIN:
            attacks[mode] = bench.scenario(mode, args.repeats)
        bench.start_hub(aggregation={"federated_gate": True})
        attacks["lying_gate"] = bench.scenario("lying_gate", args.repeats)
        bench.start_hub(secagg={"enabled": True})
        clean_sa = bench.scenario("honest", args.repeats)
        figures["clean_secagg_round_s"] = clean_sa["round_s_median"]
        figures["clean_secagg_accuracy"] = clean_sa["accuracy"]
        for mode in SECAGG:
            attacks[mode] = bench.scenario(mode, args.repeats)
        if bench.attacker is not None:
            figures["attacker_log"] = bench.attacker.log[-40:]
    finally:
        bench.close()
        if args.keep:
            say(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    worst = 0.0
    stalls_ok = True
    for name, out in attacks.items():
        clean_acc = figures["clean_secagg_accuracy"] if name in SECAGG else figures["clean_accuracy"]
        clean_s = figures["clean_secagg_round_s"] if name in SECAGG else figures["clean_round_s"]
        out["acc_drop_pts"] = round(100 * (clean_acc - out["accuracy"]), 2)
        if out["deployed"]:
            worst = max(worst, out["acc_drop_pts"])
        if name in STALLING:
            out["limit_s"] = round(3 * clean_s + 2, 2)
            out["within_limit"] = out["round_s"] <= out["limit_s"] and not out["attacker_in"]
            stalls_ok = stalls_ok and out["within_limit"]
    figures["attacks"] = attacks
    figures["worst_deployed_drop_pts"] = worst
    figures["stalls_within_limit"] = 1 if stalls_ok else 0
    return figures


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The pass with the deploy gates (the figures the targets check) and, unless ``--gate-only``, the pass with
    the generated hub.toml as it is (``without_gate``)."""
    t0 = time.monotonic()
    figures: dict[str, Any] = {"bench": "bench/attacks.py", "devices": len(HONEST) + 1, "warmup": args.warmup,
                               "repeats": args.repeats}
    figures.update(one_pass(args, gate=True))
    if not args.gate_only:
        figures["without_gate"] = one_pass(args, gate=False)
    figures["seconds"] = round(time.monotonic() - t0, 1)
    return figures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--warmup", type=int, default=3, help="clean rounds before the scenarios (the base model)")
    p.add_argument("--work", default=str(ROOT / ".fedge" / "bench" / "attacks"),
                   help="work folder of the demo task's source model, artifacts and shards (reused between runs)")
    p.add_argument("--gate-only", action="store_true",
                   help="only the pass with the deploy gates (held-out data for the hub: half of the demo's eval set, "
                        "the bench scores on the other half; the federated gate), not the one without")
    p.add_argument("--repeats", type=int, default=3, help="rounds per scenario (accuracy: their mean)")
    p.add_argument("--keep", action="store_true", help="keep the fleet folder and logs (printed on stderr)")
    args = p.parse_args()
    return finish(run(args), ATTACKS, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
