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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.codec import decode, encode_control
from protocol.errors import FedgeError
from protocol.messages import RoundOverrides, RoundResult

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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, flush=True)


def prepare(paths: DemoPaths, devices: int, seed: int, quiet: bool) -> dict[str, Any]:
    """Pre-train the source model, export it, and write the device shards and the hub's eval set."""
    from export.exporter import export_model
    from export.pretrain import pretrain_arrays
    from hub.datasets import load_source
    from hub.partition import make_device_shards, make_eval_set, write_partitions
    from hub.shifts import Shift
    from protocol.manifest import verify_artifacts

    data = load_source("auto")
    paths.root.mkdir(parents=True, exist_ok=True)
    n_source = int(len(data.x_train) * SOURCE_FRACTION)
    model_name = "cnn28" if data.x_train.ndim == 4 else "mlp"
    if not paths.source_model.exists():
        _say(quiet, f"[1/4] pre-training the source model ({model_name}) on {n_source} upright {data.name} images")
        pretrain_arrays(
            model_name, data.x_train[:n_source], data.y_train[:n_source], data.num_classes, seed, paths.source_model
        )
    try:
        verify_artifacts(paths.artifacts)
    except FedgeError:
        _say(quiet, "[2/4] exporting: model.tflite, backbone.onnx, model.onnx, ort/, manifest.json")
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
    return {"dataset": data.name, "model": model_name, "device_files": [str(f) for f in files]}


def _hub_toml(paths: DemoPaths, fleet: str, port: int, devices: int, rounds: int) -> str:
    return f"""fleet = "{fleet}"
state_dir = "{paths.hub_state}"
artifacts = "{paths.artifacts}"
eval_data = "{paths.data / 'eval.npz'}"

[broker]
url = "embedded"
embedded_host = "127.0.0.1"
embedded_port = {port}

[rounds]
min_devices = {max(1, devices - 1)}
deadline_s = 120
fraction = 1.0
local_epochs = 2
lr = 0.05
seed = 0

[aggregation]
strategy = "fedavg"
proximal_lambda = 0.01

[schedule]
chain_rounds = {rounds}
"""


def _agent_toml(paths: DemoPaths, fleet: str, port: int, i: int, data_file: str) -> str:
    return f"""device_id = "device-{i:02d}"
fleet = "{fleet}"
data = "{data_file}"
state_dir = "{paths.root / 'agents' / f'device-{i:02d}'}"
backend = "auto"
seed = {i}

[broker]
url = "mqtt://127.0.0.1:{port}"
protocol = "3.1.1"
"""


def source_accuracy(paths: DemoPaths) -> float:
    """Accuracy of the source-only model (exported head, no federated training) on the eval set."""
    from edge_agent.data import load_local
    from edge_agent.trainers import open_trainer
    from edge_agent.training import evaluate
    from protocol.manifest import load_head

    trainer = open_trainer(paths.artifacts, backend="auto")
    eval_data = load_local(paths.data / "eval.npz")
    trainer.set_head(load_head(paths.artifacts))
    _, acc = evaluate(trainer, trainer.features(eval_data.x), eval_data.y)
    return float(acc)


def _plot(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in report["rounds"]]
    accs = [r["accuracy"] for r in report["rounds"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, accs, marker="o", label="federated global model")
    ax.axhline(report["source_accuracy"], color="grey", linestyle="--", label="source model only")
    ax.set_xticks(rounds)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy on held-out device-domain data")
    ax.set_title(f"fedge demo: {report['devices']} devices, {report['dataset']}")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def run_demo(devices: int, rounds: int, out: str, *, as_json: bool = False, seed: int = 0) -> int:
    """Run the whole demo; returns 0 when the federated model ends above the source model."""
    from protocol.mqtt_config import BrokerConfig
    from protocol.topics import Topics
    from protocol.transport_mqtt import MqttTransport

    if devices < 1 or rounds < 1:
        raise FedgeError("--devices and --rounds must be at least 1")
    quiet = as_json
    paths = DemoPaths(Path(out).resolve())
    info = prepare(paths, devices, seed, quiet)
    src_acc = source_accuracy(paths)
    fleet = "demo"
    topics = Topics(fleet)
    port = _free_port()
    conf_dir = paths.root / "config"
    conf_dir.mkdir(exist_ok=True)
    for stale in (paths.hub_state, paths.root / "agents"):
        if stale.exists():
            import shutil

            shutil.rmtree(stale)
    (conf_dir / "hub.toml").write_text(_hub_toml(paths, fleet, port, devices, rounds))
    logs = paths.root / "logs"
    logs.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen[bytes]] = []
    _say(quiet, f"[4/4] embedded broker on :{port}, hub and {devices} agent processes; {rounds} rounds")
    try:
        hub_log = (logs / "hub.log").open("wb")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "hub.cli", "hub", "serve", "--config", str(conf_dir / "hub.toml")],
                stdout=hub_log, stderr=subprocess.STDOUT, env=env,
            )
        )
        broker = BrokerConfig(url=f"mqtt://127.0.0.1:{port}", protocol="3.1.1")
        watcher = MqttTransport(broker, f"fedge-demo-{os.getpid()}")
        deadline = time.monotonic() + 60
        while True:
            try:
                watcher.connect(timeout_s=2)
                break
            except FedgeError:
                if time.monotonic() > deadline or procs[0].poll() is not None:
                    raise FedgeError(f"the hub did not start its broker; see {logs / 'hub.log'}") from None
                time.sleep(0.3)
        online: set[str] = set()
        results: dict[int, RoundResult] = {}
        cond = threading.Condition()

        def on_presence(topic: str, payload: bytes) -> None:
            if not payload:
                return
            msg = decode(payload)
            with cond:
                device = getattr(msg, "device", "")
                (online.add if getattr(msg, "online", False) else online.discard)(device)
                cond.notify_all()

        def on_result(topic: str, payload: bytes) -> None:
            if not payload:
                return
            msg = decode(payload)
            if isinstance(msg, RoundResult):
                with cond:
                    results[msg.round] = msg
                    cond.notify_all()

        watcher.subscribe(topics.presence_all, on_presence)
        watcher.subscribe(topics.result, on_result)
        for i, data_file in enumerate(info["device_files"]):
            cfg = conf_dir / f"agent-{i:02d}.toml"
            cfg.write_text(_agent_toml(paths, fleet, port, i, data_file))
            log = (logs / f"agent-{i:02d}.log").open("wb")
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "edge_agent", "run", "--config", str(cfg)],
                    stdout=log, stderr=subprocess.STDOUT, env=env,
                )
            )
        with cond:
            if not cond.wait_for(lambda: len(online) >= devices, timeout=120):
                raise FedgeError(f"only {len(online)} of {devices} agents came online; see {logs}")
        _say(quiet, f"\n{'round':>5}  {'devices':>7}  {'accuracy':>8}  {'seconds':>7}")
        _say(quiet, f"{'src':>5}  {'-':>7}  {src_acc:8.3f}  {'-':>7}")
        watcher.publish(topics.control_round_start, encode_control(RoundOverrides()))
        shown = 0
        t_end = time.monotonic() + 300 * rounds
        while shown < rounds:
            with cond:
                cond.wait_for(lambda n=shown: len(results) > n, timeout=5)  # type: ignore[misc]
                done = sorted(r for r in results if r > shown)
            for r in done:
                res = results[r]
                acc = f"{res.accuracy:8.3f}" if res.accuracy is not None else f"{'failed':>8}"
                _say(quiet, f"{r:>5}  {len(res.devices):>7}  {acc}  {res.seconds:7.2f}")
                shown = max(shown, r)
            if time.monotonic() > t_end or procs[0].poll() is not None:
                raise FedgeError(f"rounds did not complete; see {logs}")
        watcher.close()
    finally:
        for p in procs[1:] + procs[:1]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
    report: dict[str, Any] = {
        "dataset": info["dataset"],
        "model": info["model"],
        "devices": devices,
        "source_accuracy": round(src_acc, 4),
        "rounds": [
            {
                "round": r.round,
                "devices": len(r.devices),
                "accuracy": None if r.accuracy is None else round(r.accuracy, 4),
                "seconds": round(r.seconds, 3),
                "status": str(r.status),
            }
            for r in sorted(results.values(), key=lambda r: r.round)
        ],
    }
    final = report["rounds"][-1]["accuracy"] if report["rounds"] else None
    report["final_accuracy"] = final
    report["beats_source"] = final is not None and final > src_acc
    report["report"] = str(paths.report)
    report["plot"] = str(paths.plot)
    paths.report.write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, paths.plot)
    if as_json:
        print(json.dumps(report))
    else:
        print(f"\nsource-only accuracy {src_acc:.3f} → federated {final if final is None else f'{final:.3f}'}")
        print(f"report: {paths.report}\nplot:   {paths.plot}")
    return 0 if report["beats_source"] else 1


__all__ = ["run_demo"]
