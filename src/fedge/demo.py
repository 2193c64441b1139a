"""``fedge demo``: the main job on one machine.

Source model pre-trained on upright Fashion-MNIST (digits where that is not installed) →
export → non-IID device shards from a *shifted* domain (rotated, lower contrast, label skew) →
embedded MQTT broker + hub process + N agent processes → R federated rounds →
live table, JSON report and PNG plot. The federated head must beat the source-only head on
held-out data of the devices' domain.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedge.hub.mosquitto import free_port
from fedge.protocol.codec import decode
from fedge.protocol.errors import FedgeError
from fedge.protocol.messages import RoundOverrides, RoundResult
from fedge.protocol.tomlfile import write_toml

SOURCE_FRACTION = 0.8
BASE_ROTATION = 90.0
BASE_CONTRAST = 0.8


@dataclass(frozen=True)
class DemoPaths:
    root: Path

    @property
    def source_model(self) -> Path:
        return self.root / "source.keras"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def hub_state(self) -> Path:
        return self.root / "hub-state"

    @property
    def report(self) -> Path:
        return self.root / "report.json"

    @property
    def plot(self) -> Path:
        return self.root / "accuracy.png"


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, flush=True)


def prepare(paths: DemoPaths, devices: int, seed: int, quiet: bool) -> dict[str, Any]:
    """Pre-train the source model, export it, and write the device shards and the hub's eval set."""
    from fedge.datasets.partition import make_device_shards, make_eval_set, write_partitions
    from fedge.datasets.shifts import Shift
    from fedge.datasets.source import load_source
    from fedge.export.exporter import export_model
    from fedge.export.pretrain import pretrain_arrays
    from fedge.protocol.manifest import verify_artifacts

    data = load_source("auto")
    paths.root.mkdir(parents=True, exist_ok=True)
    n_source = int(len(data.x_train) * SOURCE_FRACTION)
    model_name = "cnn28" if data.x_train.ndim == 4 else "mlp"
    if not paths.source_model.exists():
        _say(quiet, f"[1/4] pre-training the source model ({model_name}) on {n_source} upright {data.name} images")
        pretrain_arrays(
            model_name, data.x_train[:n_source], data.y_train[:n_source], data.num_classes, seed, paths.source_model,
            progress=not quiet,
        )
    try:
        verify_artifacts(paths.artifacts)
    except FedgeError:
        _say(quiet, "[2/4] exporting: model.tflite, backbone.onnx, ort/head, head.npz, manifest.json")
        export_model(str(paths.source_model), paths.artifacts)
    base = Shift(rotation_deg=BASE_ROTATION, contrast=BASE_CONTRAST, noise_sigma=0.0)
    if data.x_train.ndim != 4:  # feature vectors: no image shift
        base = Shift(rotation_deg=0.0, contrast=1.0, noise_sigma=0.05)
    _say(quiet, f"[3/4] {devices} non-IID device shards (Dirichlet 0.5, rotated {base.rotation_deg}°, contrast)")
    device_pool = type(data)(
        name=data.name,
        x_train=data.x_train[n_source:],
        y_train=data.y_train[n_source:],
        x_test=data.x_test,
        y_test=data.y_test,
        num_classes=data.num_classes,
    )
    per_device = min(2000, len(device_pool.x_train) // devices)
    shards = make_device_shards(device_pool, devices, 0.5, seed, base, size_per_device=per_device)
    files = write_partitions(paths.data, shards)
    make_eval_set(device_pool, base, 2000, seed, paths.data / "eval.npz")
    return {"dataset": data.name, "model": model_name, "num_classes": int(data.num_classes),
            "device_files": [str(f) for f in files]}


def _hub_toml(paths: DemoPaths, fleet: str, port: int, devices: int, rounds: int,
              http: dict[str, str] | None = None, secagg: bool = False) -> dict[str, Any]:
    return {
        "fleet": fleet, "state_dir": paths.hub_state, "artifacts": paths.artifacts,
        "eval_data": paths.data / "eval.npz",
        "broker": {"url": "embedded", "embedded_host": "127.0.0.1", "embedded_port": port},
        "rounds": {"min_devices": max(1, devices - 1), "deadline_s": 120, "fraction": 1.0, "local_epochs": 2,
                   "lr": 0.05, "seed": 0},
        "aggregation": {"strategy": "fedavg", "proximal_lambda": 0.0},
        "schedule": {"chain_rounds": rounds},
        **({"http": http} if http else {}),
        **({"secagg": {"enabled": True, "stage_timeout_s": 30.0}} if secagg else {}),
    }


def _agent_toml(paths: DemoPaths, fleet: str, port: int, i: int, data_file: str) -> dict[str, Any]:
    device = f"device-{i:02d}"
    return {
        "device_id": device, "fleet": fleet, "data": data_file, "state_dir": paths.root / "agents" / device,
        "backend": "auto", "seed": i,
        "broker": {"url": f"mqtt://127.0.0.1:{port}", "protocol": "3.1.1"},
    }


def source_accuracy(paths: DemoPaths) -> float:
    """Accuracy of the source-only model (exported head, no federated training) on the eval set."""
    from fedge.core.training import evaluate
    from fedge.protocol.manifest import load_head
    from fedge.runtime.data import load_local
    from fedge.runtime.trainers import open_trainer

    trainer = open_trainer(paths.artifacts, backend="auto")
    eval_data = load_local(paths.data / "eval.npz")
    trainer.set_head(load_head(paths.artifacts))
    acc = evaluate(trainer, trainer.features(eval_data.x), eval_data.y).accuracy
    return float(acc)


def _plot(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in report["rounds"]]
    accs = [r["accuracy"] for r in report["rounds"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, accs, marker="o", label="global model (hub's held-out data)")
    for key, label in (("fed_global", "global (devices' validation)"), ("fed_personal", "personalised"),
                       ("fed_local_only", "local-only"), ("fed_source", "source (devices' validation)")):
        values = [r.get(key, float("nan")) for r in report["rounds"]]
        if any(key in r for r in report["rounds"]):
            ax.plot(rounds, values, marker=".", linestyle=":", label=label)
    ax.axhline(report["source_accuracy"], color="grey", linestyle="--", label="source model only")
    ax.set_xticks(rounds)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy on held-out device-domain data")
    ax.set_title(f"fedge demo: {report['devices']} devices, {report['dataset']}")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


CHANCE_MARGIN = 0.1  # the federated model must beat chance (1/C) by this much, whatever the source model did
PERSONAL_MARGIN = 0.005  # the devices' personal heads may trail their local-only heads by at most half a point


class DemoFleet:
    """The demo's processes: the hub (with its embedded broker) and N agents, plus a watcher connection that
    sees presence and round results. A context manager: leaving it stops every process (agents first)."""

    def __init__(self, paths: DemoPaths, devices: int, rounds: int, device_files: list[str],
                 http: dict[str, str] | None = None, secagg: bool = False) -> None:
        self.paths, self.devices, self.rounds, self.device_files = paths, devices, rounds, device_files
        self.secagg = secagg
        self.http = http  # the hub's [http] table (dashboard), or None
        self.fleet = "demo"
        self.port = free_port()
        self.conf_dir = paths.root / "config"
        self.logs = paths.root / "logs"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.online: set[str] = set()
        self.results: dict[int, RoundResult] = {}
        self.cond = threading.Condition()
        self.watcher: Any = None
        self.operator: Any = None

    def __enter__(self) -> DemoFleet:
        import shutil

        self.conf_dir.mkdir(exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        for stale in (self.paths.hub_state, self.paths.root / "agents"):
            if stale.exists():
                shutil.rmtree(stale)
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.watcher is not None:
            self.watcher.close()
        for p in self.procs[1:] + self.procs[:1]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        with (self.logs / log_name).open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self.procs.append(proc)
        return proc

    def start_hub(self, timeout_s: float = 60.0) -> None:
        """Start the hub process and connect the watcher to its embedded broker."""
        from fedge.hub.operator import Operator
        from fedge.protocol.mqtt_config import BrokerConfig
        from fedge.protocol.topics import Topics
        from fedge.protocol.transport_mqtt import MqttTransport

        hub_toml = write_toml(self.conf_dir / "hub.toml",
                              _hub_toml(self.paths, self.fleet, self.port, self.devices, self.rounds, self.http,
                                        self.secagg))
        hub = self._spawn(["fedge.cli", "hub", "serve", "--config", str(hub_toml)], "hub.log")
        self.watcher = MqttTransport(BrokerConfig(url=f"mqtt://127.0.0.1:{self.port}", protocol="3.1.1"),
                                     f"fedge-demo-{os.getpid()}")
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.watcher.connect(timeout_s=2)
                break
            except FedgeError:
                if time.monotonic() > deadline or hub.poll() is not None:
                    raise FedgeError(f"the hub did not start its broker; see {self.logs / 'hub.log'}") from None
                time.sleep(0.3)
        self.watcher.subscribe(Topics(self.fleet).presence_all, self._on_presence)
        self.operator = Operator(self.watcher, self.fleet, on_result=self._on_result)

    def _on_presence(self, _topic: str, payload: bytes) -> None:
        if not payload:
            return
        msg = decode(payload)
        with self.cond:
            device = getattr(msg, "device", "")
            (self.online.add if getattr(msg, "online", False) else self.online.discard)(device)
            self.cond.notify_all()

    def _on_result(self, msg: RoundResult) -> None:
        with self.cond:
            self.results[msg.round] = msg
            self.cond.notify_all()

    def start_agents(self, timeout_s: float = 120.0) -> None:
        """Start one agent process per device file and wait until all of them are online."""
        for i, data_file in enumerate(self.device_files):
            cfg = write_toml(self.conf_dir / f"agent-{i:02d}.toml",
                             _agent_toml(self.paths, self.fleet, self.port, i, data_file))
            self._spawn(["fedge.edge_agent", "run", "--config", str(cfg)], f"agent-{i:02d}.log")
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.online) >= self.devices, timeout=timeout_s):
                raise FedgeError(f"only {len(self.online)} of {self.devices} agents came online; see {self.logs}")

    def run_rounds(self, on_result: Callable[[RoundResult], None], timeout_per_round_s: float = 300.0
                   ) -> list[RoundResult]:
        """Start the chain of rounds from the control topic; call ``on_result`` as each round closes."""
        reply = self.operator.start(RoundOverrides())
        if not reply["accepted"]:
            raise FedgeError(f"the hub refused the rounds: {reply['reason']} ({reply['detail']})")
        shown = 0
        t_end = time.monotonic() + timeout_per_round_s * self.rounds
        while shown < self.rounds:
            with self.cond:
                self.cond.wait_for(lambda n=shown: len(self.results) > n, timeout=5)  # type: ignore[misc]
                done = sorted(r for r in self.results if r > shown)
            for r in done:
                on_result(self.results[r])
                shown = max(shown, r)
            if time.monotonic() > t_end or self.procs[0].poll() is not None:
                raise FedgeError(f"rounds did not complete; see {self.logs}")
        return [self.results[r] for r in sorted(self.results)]


def build_report(info: dict[str, Any], devices: int, src_acc: float, results: list[RoundResult],
                 paths: DemoPaths) -> dict[str, Any]:
    """The demo's report; ``passed`` requires the final global model to beat the source model *and* chance."""
    rounds: list[dict[str, Any]] = [
        {"round": r.round, "devices": len(r.devices), "accuracy": None if r.accuracy is None else round(r.accuracy, 4),
         "seconds": round(r.seconds, 3), "status": str(r.status),
         # federated evaluation on the devices' own validation data (absent under DP)
         **{f"fed_{h}": r.federated[f"val_acc_{h}"] for h in ("source", "local_only", "global", "personal")
            if f"val_acc_{h}" in r.federated}}
        for r in results
    ]
    final: float | None = results[-1].accuracy if results else None
    chance = 1.0 / int(info["num_classes"])
    report: dict[str, Any] = {
        "dataset": info["dataset"], "model": info["model"], "devices": devices, "num_classes": info["num_classes"],
        "source_accuracy": round(src_acc, 4), "chance_accuracy": round(chance, 4), "rounds": rounds,
        "final_accuracy": final,
        "beats_source": final is not None and final > src_acc,
        "beats_chance": final is not None and final >= chance + CHANCE_MARGIN,
        "report": str(paths.report), "plot": str(paths.plot),
    }
    # the devices' own view: their personal heads at least as good as training alone, in the last round that has
    # the figures (None: not measured, under DP or SecAgg devices send no scores)
    scored = [r for r in rounds if "fed_personal" in r and "fed_local_only" in r]
    report["personal_ge_local_only"] = (None if not scored else
                                        scored[-1]["fed_personal"] >= scored[-1]["fed_local_only"] - PERSONAL_MARGIN)
    report["passed"] = (report["beats_source"] and report["beats_chance"]
                        and report["personal_ge_local_only"] is not False)
    return report


def _print_summary(report: dict[str, Any]) -> None:
    final = report["final_accuracy"]
    how = " (secure aggregation: the hub saw only sums)" if report.get("secure_aggregation") else ""
    print(f"\nsource-only accuracy {report['source_accuracy']:.3f} → federated "
          f"{'-' if final is None else f'{final:.3f}'} (chance {report['chance_accuracy']:.3f}){how}")
    last = report["rounds"][-1] if report["rounds"] else {}
    if "fed_personal" in last and "fed_local_only" in last:
        print(f"on the devices' own held-out data: personalised {last['fed_personal']:.3f}, local-only "
              f"{last['fed_local_only']:.3f}, global {last.get('fed_global', float('nan')):.3f}")
    if not report["passed"]:
        why = ("the source model" if not report["beats_source"] else f"chance + {CHANCE_MARGIN}"
               if not report["beats_chance"] else "local-only training on the devices (personalised heads)")
        print(f"FAILED: the federated model did not beat {why}")
    print(f"report: {report['report']}\nplot:   {report['plot']}")


def _dashboard(listen: str) -> tuple[dict[str, str], str, tuple[str, int]]:
    """The hub's [http] table for ``--http HOST:PORT``, the URL to open and the address to wait for. Port 0 picks a
    free port; off loopback a random token is made (and put in the URL)."""
    import secrets

    from fedge.hub.dashboard.listen import is_loopback, parse_listen

    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        raise FedgeError(f"--http: {exc}") from None
    local = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # every address: open it on this machine
    port = port or free_port(local if ":" not in local else "127.0.0.1")
    table = {"listen": f"[{host}]:{port}" if ":" in host else f"{host}:{port}"}
    if not is_loopback(host):
        table["token"] = secrets.token_urlsafe(24)
    url = f"http://{f'[{local}]' if ':' in local else local}:{port}/" + (f"?token={table['token']}"
                                                                        if "token" in table else "")
    return table, url, (local, port)


def run_demo(devices: int, rounds: int, out: str, *, as_json: bool = False, seed: int = 0, http: str | None = None,
             hold: bool = False, secagg: bool = False) -> int:
    """Run the whole demo; returns 0 when the federated model ends above the source model and above chance.

    ``http`` (HOST:PORT): the hub serves its dashboard there (its URL is printed); ``hold``: the fleet keeps
    running after the last round until Ctrl-C (SIGINT); ``secagg``: every round is a secure-aggregation round."""
    if devices < 1 or rounds < 1:
        raise FedgeError("--devices and --rounds must be at least 1")
    dashboard = _dashboard(http) if http else None
    quiet = as_json
    paths = DemoPaths(Path(out).resolve())
    info = prepare(paths, devices, seed, quiet)
    src_acc = source_accuracy(paths)

    def show(res: RoundResult) -> None:
        acc = f"{res.accuracy:8.3f}" if res.accuracy is not None else f"{'failed':>8}"
        fed = "  ".join(f"{res.federated[k]:8.3f}" if k in res.federated else f"{'-':>8}"
                        for k in ("val_acc_local_only", "val_acc_personal"))
        _say(quiet, f"{res.round:>5}  {len(res.devices):>7}  {acc}  {fed}  {res.seconds:7.2f}")

    def tell(text: str) -> None:  # the dashboard's lines: on stderr under --json (stdout is one JSON object)
        print(text, file=sys.stderr if as_json else sys.stdout, flush=True)

    with DemoFleet(paths, devices, rounds, info["device_files"], None if dashboard is None else dashboard[0],
                   secagg) as fleet:
        _say(quiet, f"[4/4] embedded broker on :{fleet.port}, hub and {devices} agent processes; {rounds} rounds")
        fleet.start_hub()
        if dashboard is not None:
            from fedge.hub.mosquitto import wait_port

            try:
                wait_port(*dashboard[2], timeout_s=30)
            except TimeoutError:
                raise FedgeError(f"the hub's dashboard did not come up; see {fleet.logs / 'hub.log'}") from None
            tell(f"dashboard: {dashboard[1]}")
        fleet.start_agents()
        _say(quiet, "\n(accuracy: the global model on the hub's held-out data; local-only and personal: the devices' "
                    "own heads on their held-out rows)")
        _say(quiet, f"{'round':>5}  {'devices':>7}  {'accuracy':>8}  {'local':>8}  {'personal':>8}  {'seconds':>7}")
        _say(quiet, f"{'src':>5}  {'-':>7}  {src_acc:8.3f}  {'-':>8}  {'-':>8}  {'-':>7}")
        results = fleet.run_rounds(show)
        report = build_report(info, devices, src_acc, results, paths)
        report["secure_aggregation"] = secagg
        paths.report.write_text(json.dumps(report, indent=2) + "\n")
        _plot(report, paths.plot)
        if as_json:
            print(json.dumps(report), flush=True)
        else:
            _print_summary(report)
        if hold:
            where = f"; dashboard: {dashboard[1]}" if dashboard is not None else ""
            tell(f"holding: hub and {devices} agents keep running{where}; more rounds: fedge round start --fleet "
                 f"{fleet.fleet} --broker mqtt://127.0.0.1:{fleet.port}; Ctrl-C to stop")
            try:
                while fleet.procs[0].poll() is None:
                    time.sleep(0.5)
                tell(f"the hub exited; see {fleet.logs / 'hub.log'}")
            except KeyboardInterrupt:
                tell("stopping the fleet")
    return 0 if report["passed"] else 1


__all__ = ["CHANCE_MARGIN", "DemoFleet", "DemoPaths", "build_report", "prepare", "run_demo", "source_accuracy"]
