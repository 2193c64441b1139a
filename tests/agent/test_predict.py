"""``fedge-agent predict`` (issue 20): it reads the very CSV the agent trains on (header line, label column), and
serves the best of the personal, global and source heads on the device's validation split, saying which.

A device holds a model installed by an agent over an in-memory broker (real exported artifacts, no TensorFlow:
this file runs in the agent-only venv too). Its data is labelled by the exported head itself, so that head (the
global v1 and the source head both) is right on every row; a personal head with a large bias on one class is
worse on the validation rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from fedge.core.evaluation import split_indices
from fedge.edge_agent.__main__ import main as agent_main
from fedge.edge_agent.agent import Agent
from fedge.edge_agent.config import AgentConfig, load_config
from fedge.edge_agent.predict import predict
from fedge.edge_agent.state import AgentState
from fedge.protocol.errors import DataError
from fedge.protocol.manifest import Manifest, load_head, save_head
from fedge.protocol.transport import InMemoryTransport
from fedge.runtime.data import load_local
from fedge.runtime.trainers import open_trainer
from tests.agent_loop.test_agent_loop import DEV, FLEET, Hub, T, model_full, model_head

N = 60


@pytest.fixture
def manifest(artifacts_dir: Path) -> Manifest:
    return Manifest.from_json((artifacts_dir / "manifest.json").read_text())


def _exported_predictions(artifacts_dir: Path, x: NDArray[np.float32]) -> NDArray[np.int64]:
    trainer = open_trainer(artifacts_dir, "auto")
    trainer.set_head(load_head(artifacts_dir))
    return trainer.logits(trainer.features(x)).argmax(axis=1).astype(np.int64)


def _write_csv(path: Path, x: NDArray[np.float32], y: NDArray[np.int64] | None) -> Path:
    flat = x.reshape(len(x), -1)
    names = [f"px{i}" for i in range(flat.shape[1])]
    table: NDArray[np.float64] = flat.astype(np.float64)
    if y is not None:
        names.append("label")
        table = np.column_stack([table, y])
    np.savetxt(path, table, delimiter=",", header=",".join(names), comments="", fmt="%.9g")
    return path


@pytest.fixture
def device(tmp_path: Path, artifacts_dir: Path, manifest: Manifest) -> tuple[Path, NDArray[np.float32],
                                                                            NDArray[np.int64]]:
    """``(agent.toml, x, y)``: a device that trains on a header CSV and holds model v1 (installed by its agent)."""
    rng = np.random.default_rng(5)
    x = rng.random((N, *manifest.input.shape), dtype=np.float32)
    y = _exported_predictions(artifacts_dir, x)
    _write_csv(tmp_path / "local.csv", x, y)
    x = load_local(tmp_path / "local.csv", manifest.input.shape).x  # as the agent reads it (%.9g: float32 exactly)
    (tmp_path / "agent.toml").write_text(
        f'device_id = "{DEV}"\nfleet = "{FLEET}"\ndata = "local.csv"\nstate_dir = "state"\nbackend = "auto"\n'
        '[broker]\nurl = "mqtt://127.0.0.1:1"\n')
    hub = Hub()
    hub.send(T.model_full, model_full(artifacts_dir, manifest), retain=True)
    hub.send(T.model_head, model_head(artifacts_dir, manifest), retain=True)
    agent = Agent(load_config(tmp_path / "agent.toml"), transport=InMemoryTransport(hub.broker))
    agent.start()  # reads local.csv (header and label column) and installs v1
    agent.stop()
    assert AgentState.load(tmp_path / "state" / "state.json").model_version == "v1"
    return tmp_path / "agent.toml", x, y


def _biased(head: dict[str, NDArray[np.float32]], cls: int) -> dict[str, NDArray[np.float32]]:
    """``head`` voting ``cls`` for every row."""
    out = {k: v.copy() for k, v in head.items()}
    last = max(k for k in out if k.endswith("_bias"))
    out[last][cls] += 1e3
    return out


def _val_labels(config: AgentConfig, y: NDArray[np.int64]) -> NDArray[np.int64]:
    data = load_local(config.data)
    return y[split_indices(len(y), config.validation_fraction, data.sha256)[1]]


def test_a_personal_head_worse_than_the_global_one_on_validation_is_not_served(
    device: tuple[Path, NDArray[np.float32], NDArray[np.int64]], artifacts_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    toml, _x, y = device
    config = load_config(toml)
    val_y = _val_labels(config, y)
    rare = int(np.bincount(val_y, minlength=10).argmin())  # wrong on (almost) every validation row
    save_head(config.state_dir / "personal_head.npz", _biased(load_head(artifacts_dir), rare))

    result = predict(config, config.data, backend="auto")  # the training file itself: header and label column
    choice = result.choice
    assert choice.which == "global v1"
    assert choice.val_n == len(val_y) == round(0.2 * N)
    assert set(choice.scores) == {"personal", "global v1", "source"}
    assert choice.scores["global v1"].accuracy == 1.0
    assert choice.scores["personal"].accuracy == np.mean(val_y == rare) < 1.0
    np.testing.assert_array_equal(result.classes, y)  # the global head's predictions, on every row
    assert np.all((result.probability > 0) & (result.probability <= 1))

    assert agent_main(["predict", "--config", str(toml), "--data", str(config.data)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "row,class,probability" and len(out.splitlines()) == N + 1
    assert [int(line.split(",")[1]) for line in out.splitlines()[1:]] == y.tolist()
    assert f"{N} predictions with the global v1 head, the best on {len(val_y)} validation rows" in err
    assert f"personal {np.mean(val_y == rare):.3f}" in err and "global v1 1.000" in err and "source 1.000" in err


def test_the_personal_head_is_served_when_it_is_the_best(
    device: tuple[Path, NDArray[np.float32], NDArray[np.int64]], artifacts_dir: Path, tmp_path: Path,
) -> None:
    toml, x, y = device
    config = load_config(toml)
    rare = int(np.bincount(_val_labels(config, y), minlength=10).argmin())
    exported = load_head(artifacts_dir)
    save_head(config.state_dir / "personal_head.npz", exported)
    save_head(config.state_dir / "heads" / "v1.npz", _biased(exported, rare))  # a global head gone wrong
    result = predict(config, _write_csv(tmp_path / "new.csv", x[:7], None))  # unlabelled rows, with a header
    assert result.choice.which == "personal"  # ties with the source head: personal first
    assert result.choice.scores["global v1"].accuracy < result.choice.scores["personal"].accuracy == 1.0
    np.testing.assert_array_equal(result.classes, y[:7])
    np.savez(tmp_path / "new.npz", x=x[:5])  # no y
    np.testing.assert_array_equal(predict(config, tmp_path / "new.npz").classes, y[:5])


def test_without_validation_rows_predict_says_why(
    device: tuple[Path, NDArray[np.float32], NDArray[np.int64]], artifacts_dir: Path, tmp_path: Path,
) -> None:
    toml = device[0]
    toml.write_text(toml.read_text().replace('backend = "auto"\n', 'backend = "auto"\nvalidation_fraction = 0\n'))
    config = load_config(toml)
    save_head(config.state_dir / "personal_head.npz", load_head(artifacts_dir))
    choice = predict(config, config.data).choice
    assert choice.which == "personal" and not choice.scores
    assert "no validation rows (validation_fraction 0" in choice.describe()
    _write_csv(tmp_path / "wide.csv", np.zeros((2, 3, 3), np.float32), None)
    with pytest.raises(DataError, match=r"wide\.csv: rows have 9 columns; the model takes 784 features"):
        predict(config, tmp_path / "wide.csv")
