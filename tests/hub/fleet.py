"""A hub on an in-memory broker plus scripted fake devices (shared by the hub tests)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedge.hub.config import HubConfig, config_from_mapping
from fedge.hub.daemon import HubDaemon
from fedge.protocol.codec import decode, encode, encode_control
from fedge.protocol.manifest import save_head
from fedge.protocol.messages import (
    Message,
    ModelHead,
    ModelUpdate,
    Presence,
    RoundAnnounce,
    RoundOverrides,
    RoundResult,
)
from fedge.protocol.topics import Topics
from fedge.protocol.transport import InMemoryBroker, InMemoryTransport
from fedge.runtime.evaluate import EvalFn

FLEET = "f1"
TOPICS = Topics(FLEET)


F, H, C = 6, 4, 3
SHAPES = {"h0_kernel": (F, H), "h0_bias": (H,), "h1_kernel": (H, C), "h1_bias": (C,)}


def make_artifacts(folder: Path, seed: int = 0, backbone_bytes: bytes = b"not really onnx") -> Path:
    """A manifest-valid artifacts folder with a small 2-layer head and one opaque backbone file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    head = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    save_head(folder / "head.npz", head)
    (folder / "backbone.onnx").write_bytes(backbone_bytes)
    files = {}
    for name in ("backbone.onnx", "head.npz"):
        data = (folder / name).read_bytes()
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest: dict[str, Any] = {
        "format": 1, "model": "synthetic", "input": {"name": "x", "shape": [F], "dtype": "float32"},
        "feature_dim": F, "num_classes": C, "train_batch": 8,
        "head": [{"name": k, "shape": list(s), "dtype": "float32"} for k, s in SHAPES.items()],
        "head_activations": ["relu", "linear"],
        "backbone_sha256": hashlib.sha256(backbone_bytes).hexdigest(),
        "files": files, "created": "2026-01-01T00:00:00Z",
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def hub_config(state_dir: Path, artifacts: Path, **sections: Any) -> HubConfig:
    table: dict[str, Any] = {
        "fleet": FLEET, "state_dir": str(state_dir), "artifacts": str(artifacts),
        "broker": {"url": "mqtt://127.0.0.1:1883"},
        "rounds": {"min_devices": 2, "deadline_s": 30, "seed": 1},
        # these hubs have no eval_data: the default ("auto") would gate every version by an evaluation round;
        # the tests of that gate ask for it explicitly
        "aggregation": {"federated_gate": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(table.get(key), dict):
            table[key] = {**table[key], **value}
        else:
            table[key] = value
    return config_from_mapping(table, state_dir.parent)


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class Device:
    name: str
    transport: InMemoryTransport
    inbox: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.transport.subscribe(TOPICS.device_inbox(self.name), lambda _t, p: self.inbox.append(decode(p)))

    def hello(self, n_samples: int = 100, online: bool = True, dp: bool = True) -> None:
        msg = Presence(fleet=FLEET, device=self.name, online=online, n_samples=n_samples, backends=("numpy",), dp=dp)
        self.transport.publish(TOPICS.presence(self.name), encode(msg), retain=True)

    def update(self, rnd: RoundAnnounce, delta: dict[str, np.ndarray], n: int = 10, **over: Any) -> ModelUpdate:
        kwargs: dict[str, Any] = {"fleet": FLEET, "round": rnd.round, "device": self.name,
                                  "model_version": rnd.model_version, "n_samples": n, "delta": delta,
                                  "metrics": {"loss_after": 1.0}}
        kwargs.update(over)
        msg = ModelUpdate(**kwargs)
        self.send(encode(msg))
        return msg

    def send(self, payload: bytes, topic_device: str | None = None) -> None:
        self.transport.publish(TOPICS.update(topic_device or self.name), payload)

    def kinds(self) -> list[str]:
        return [str(m.type) for m in self.inbox]


class Fleet:
    """Hub + broker + watcher of retained state; ``devices`` are created on demand."""

    def __init__(self, cfg: HubConfig, broker: InMemoryBroker | None = None, evaluator: EvalFn | None = None) -> None:
        self.cfg = cfg
        self.broker = broker or InMemoryBroker()
        self.clock = Clock()
        self.results: list[RoundResult] = []
        self.heads: list[ModelHead] = []
        watcher = InMemoryTransport(self.broker)
        # results: the operators' full copy (control/round/result); round/result, what devices read, in
        # device_results (a selection round's result is only there, and then in results too)
        self.device_results: list[RoundResult] = []
        watcher.subscribe(TOPICS.control_round_result, self._full_result)
        watcher.subscribe(TOPICS.result, self._device_result)
        watcher.subscribe(TOPICS.model_head, lambda _t, p: p and self.heads.append(decode(p)))  # type: ignore[func-returns-value, arg-type]
        self.hub = HubDaemon(cfg, InMemoryTransport(self.broker), clock=self.clock,
                             evaluator=evaluator or (lambda _d, _s, _h: None), tick_s=0.02,
                             rng=np.random.default_rng(1234))
        self.devices: dict[str, Device] = {}

    def _full_result(self, _topic: str, payload: bytes) -> None:
        if payload:
            msg = decode(payload)
            assert isinstance(msg, RoundResult)
            self.results.append(msg)

    def _device_result(self, _topic: str, payload: bytes) -> None:
        if payload:
            msg = decode(payload)
            assert isinstance(msg, RoundResult)
            self.device_results.append(msg)
            if all(r.round != msg.round for r in self.results):
                self.results.append(msg)

    def device(self, name: str) -> Device:
        if name not in self.devices:
            self.devices[name] = Device(name, InMemoryTransport(self.broker))
        return self.devices[name]

    def retained(self, topic: str) -> Message | None:
        payload = self.broker.retained.get(topic)
        return None if payload is None else decode(payload)

    def announce(self) -> RoundAnnounce:
        msg = self.retained(TOPICS.announce)
        assert isinstance(msg, RoundAnnounce), msg
        return msg

    def start_round(self, **overrides: Any) -> RoundAnnounce:
        self.control(encode_control(RoundOverrides(**overrides)))
        return self.announce()

    def control(self, payload: bytes) -> None:
        InMemoryTransport(self.broker).publish(TOPICS.control_round_start, payload)

    def advance(self, seconds: float) -> None:
        self.clock.t += seconds
        self.hub.tick()

    def jsonl(self) -> list[dict[str, Any]]:
        path = self.cfg.state_dir / "rounds.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def zero_delta(shapes: dict[str, tuple[int, ...]], value: float = 0.0) -> dict[str, np.ndarray]:
    return {k: np.full(s, value, np.float32) for k, s in shapes.items()}


def run_hub(cfg: HubConfig, **kw: Any) -> Iterator[Fleet]:
    fleet = Fleet(cfg, **kw)
    fleet.hub.start()
    try:
        yield fleet
    finally:
        fleet.hub.stop()


def iter_hub(cfg: HubConfig, **kw: Any) -> Generator[Fleet, None, None]:
    """Like run_hub, typed as a generator (``.close()`` stops the hub)."""
    yield from run_hub(cfg, **kw)


Factory = Callable[..., Fleet]
