"""Fixtures of the end-to-end suite: session-wide artifacts and data, a per-test ``Fleet``.

The fleet's process logs are attached to the report of a failing test (section "fleet logs").
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.e2e.fleet import Fleet, FleetData
from tests.helpers import Mosquitto, free_port

N_DEVICES = 5
PER_DEVICE = 300
EVAL_SIZE = 500


@pytest.fixture(scope="session")
def fleet_data(tmp_path_factory: pytest.TempPathFactory) -> FleetData:
    """export_small artifacts (once), 5 non-IID Fashion-MNIST shards of 300 samples, a 500-sample eval set."""
    from fedge.datasets.partition import make_device_shards, make_eval_set, write_partitions
    from fedge.datasets.shifts import Shift
    from fedge.datasets.source import load_source
    from fedge.export.testing import export_small

    root = tmp_path_factory.mktemp("e2e-data")
    export_small(root / "artifacts", "cnn28", seed=0)
    source = load_source("auto")
    shards = make_device_shards(source, N_DEVICES, 0.5, 7, Shift(), size_per_device=PER_DEVICE)
    files = write_partitions(root / "shards", shards, source.num_classes)
    make_eval_set(source, Shift(), EVAL_SIZE, 7, root / "eval.npz")
    return FleetData(root / "artifacts", tuple(files), tuple(len(s.y) for s in shards), root / "eval.npz")


@pytest.fixture(scope="session")
def v0_accuracy(fleet_data: FleetData) -> float:
    """Accuracy of the exported (source) head on the eval set, computed agent-side, independent of the hub."""
    from fedge.protocol.manifest import load_head
    from fedge.runtime.data import load_local
    from fedge.runtime.trainers import open_trainer

    trainer = open_trainer(fleet_data.artifacts, backend="auto")
    trainer.set_head(load_head(fleet_data.artifacts))
    data = load_local(fleet_data.eval_file, (28, 28, 1))
    logits = trainer.logits(trainer.features(data.x))
    return float((np.argmax(logits, axis=1) == data.y).mean())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        fleets = getattr(item, "_e2e_fleets", [])
        for f in fleets:
            rep.sections.append((f"fleet logs ({f.root.name})", f.logs_text()))


@pytest.fixture
def make_fleet(request: pytest.FixtureRequest, tmp_path: Path,
               fleet_data: FleetData) -> Iterator[Callable[..., Fleet]]:
    """``make_fleet(broker_url, embedded_port=None, accounts=None)`` -> Fleet; every process is killed at teardown.
    ``accounts``: ``[broker]`` tables by account ("hub", "watcher", device ids), e.g. a RabbitMQ login."""
    made: list[Fleet] = []
    request.node._e2e_fleets = made

    def make(broker_url: str, *, embedded_port: int | None = None, n_agents: int = N_DEVICES,
             accounts: Mapping[str, Mapping[str, Any]] | None = None) -> Fleet:
        f = Fleet(tmp_path / f"fleet{len(made)}", fleet_data, broker_url, n_agents=n_agents,
                  embedded_port=embedded_port, accounts=accounts)
        made.append(f)
        return f

    try:
        yield make
    finally:
        for f in made:
            f.close()


@pytest.fixture
def fleet(make_fleet: Callable[..., Fleet], mosquitto: Mosquitto) -> Fleet:
    """A Fleet over a fresh mosquitto (processes not started yet)."""
    return make_fleet(mosquitto.url)


@pytest.fixture
def embedded_fleet(make_fleet: Callable[..., Fleet]) -> Fleet:
    """A Fleet whose hub runs the embedded amqtt broker on a free port; agents point at that port."""
    port = free_port()
    return make_fleet(f"mqtt://127.0.0.1:{port}", embedded_port=port)
