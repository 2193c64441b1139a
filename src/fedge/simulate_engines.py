"""Where the simulator's virtual devices train: in this process (the default), or on a Ray cluster.

An engine takes a round's device jobs (the announce, each device's data, heads and policy) and returns each
device's outcome of the round core's :func:`fedge.core.device.train`, in job order. Everything after training
(DP noise, compression, aggregation, the hub's close) stays in the driver, in order, so a run gives the same heads
on every engine. The Ray engine (``--engine ray``, the ``ray`` extra) keeps one actor per CPU of the cluster, each
with its own trainer over the run's artifacts, and the devices' features in Ray's object store (put once per
run; only heads and policies travel per job): 100,000 virtual devices are a cluster away.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fedge.core import device as core
from fedge.core.trainer import Trainer
from fedge.protocol.errors import ConfigError, TrainingDiverged
from fedge.protocol.messages import RoundAnnounce

__all__ = ["ENGINES", "DeviceJob", "Engine", "InProcess", "RayEngine", "Result", "open_engine"]

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class DeviceJob:
    """One device's round: its index, data, the heads it starts from and its policy."""

    device: int
    data: core.DeviceData
    heads: core.RoundHeads
    policy: core.DevicePolicy


Result = core.Trained | core.Declined | core.Closed | None
"""A device's outcome (None: its training diverged even at a backed-off rate: it declines)."""


class Engine(Protocol):
    name: str

    def run(self, msg: RoundAnnounce, jobs: Sequence[DeviceJob], private: bool) -> list[Result]: ...

    def close(self) -> None: ...


def _train(trainer: Trainer, msg: RoundAnnounce, job: DeviceJob, private: bool) -> Result:
    try:
        return core.train(msg, trainer, job.data, job.heads, job.policy, private=private)
    except TrainingDiverged:
        return None


class InProcess:
    """Every device, one after the other, on the run's trainer."""

    name = "local"

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def run(self, msg: RoundAnnounce, jobs: Sequence[DeviceJob], private: bool) -> list[Result]:
        return [_train(self.trainer, msg, job, private) for job in jobs]

    def close(self) -> None:
        return None


class RayEngine:
    """Devices trained by a pool of Ray actors, each with its own trainer over ``artifacts`` (``address``: an
    existing cluster; None: a local one)."""

    name = "ray"

    def __init__(self, artifacts: Path, backend: str, data: Sequence[core.DeviceData], address: str | None = None,
                 actors: int | None = None) -> None:
        import importlib
        import logging

        try:
            ray: Any = importlib.import_module("ray")
        except ImportError as exc:
            raise ConfigError("engine", "the ray engine needs Ray: pip install 'fedge[ray]'") from exc
        self._ray = ray
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
            self._owns = True
        else:
            self._owns = False
        count = actors or max(int(ray.cluster_resources().get("CPU", 1)), 1)
        worker: Any = ray.remote(num_cpus=1)(_RayWorker)
        shared = ray.put(list(data))  # every device's features and labels, once, in the object store
        self._actors: list[Any] = [worker.remote(str(artifacts), backend, shared) for _ in range(count)]

    def run(self, msg: RoundAnnounce, jobs: Sequence[DeviceJob], private: bool) -> list[Result]:
        ray = self._ray
        refs = [self._actors[k % len(self._actors)].train.remote(msg, job.device, job.heads, job.policy, private)
                for k, job in enumerate(jobs)]  # the data stays with the actors: only heads and policies travel
        results: list[Result] = ray.get(refs)
        return results

    def close(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor)
        if self._owns:
            self._ray.shutdown()


class _RayWorker:
    """A Ray actor: one trainer, opened once, and the devices' data; trains the devices it is given."""

    def __init__(self, artifacts: str, backend: str, data: list[core.DeviceData]) -> None:
        from fedge.runtime.trainers import open_trainer

        self.trainer: Any = open_trainer(artifacts, backend)
        self.data = data

    def train(self, msg: RoundAnnounce, device: int, heads: core.RoundHeads, policy: core.DevicePolicy,
              private: bool) -> Result:
        return _train(self.trainer, msg, DeviceJob(device, self.data[device], heads, policy), private)


def open_engine(name: str, trainer: Trainer, artifacts: Path, data: Sequence[core.DeviceData],
                address: str | None = None) -> Engine:
    """The engine ``name`` (``local`` or ``ray``) for a run over ``artifacts`` trained by ``trainer``'s back-end on
    the devices' ``data``."""
    if name == "local":
        return InProcess(trainer)
    if name == "ray":
        return RayEngine(artifacts, trainer.name, data, address)
    raise ConfigError("engine", f"{name!r} is not one of {', '.join(ENGINES)}")
