"""hub.toml: defaults, embedded broker, every invalid field named in the error."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from fedge.hub.config import load_config
from fedge.protocol.errors import ConfigError


def test_valid_config_resolves_paths_and_defaults(hub_toml: Callable[..., Path], tmp_path: Path) -> None:
    cfg = load_config(hub_toml())
    assert cfg.fleet == "f1"
    assert cfg.state_dir == (tmp_path / "state").resolve()
    assert cfg.rounds.min_devices == 2 and cfg.rounds.deadline_s == 30
    assert cfg.aggregation.strategy == "fedavg" and cfg.aggregation.proximal_lambda == 0.0
    assert cfg.schedule.every_s == 0 and cfg.schedule.chain_rounds == 0
    assert cfg.eval_data is None and cfg.devices is None
    assert not cfg.broker.embedded


def test_embedded_broker_url(tmp_path: Path, artifacts: Path) -> None:
    path = tmp_path / "hub.toml"
    path.write_text(f'fleet = "f"\nartifacts = "{artifacts}"\n[broker]\nurl = "embedded"\nembedded_port = 18883\n')
    cfg = load_config(path)
    assert cfg.broker.embedded and cfg.broker.embedded_port == 18883
    assert cfg.broker.config.url == "mqtt://127.0.0.1:18883"


@pytest.mark.parametrize(
    ("extra", "rounds", "field"),
    [
        ("", "deadline_s = 0\n", "rounds.deadline_s"),
        ("", "deadline_s = \"soon\"\n", "rounds.deadline_s"),
        ("", "min_devices = 0\n", "rounds.min_devices"),
        ("", "fraction = 1.5\n", "rounds.fraction"),
        ("", "local_epochs = true\n", "rounds.local_epochs"),
        ("", "lr = -1\n", "rounds.lr"),
        ("", "max_update_bytes = 10\n", "rounds.max_update_bytes"),
        ("", "nonsense = 1\n", "rounds.nonsense"),
        ("", "min_devices = 3\n[aggregation]\nproximal_lambda = -0.1\n", "aggregation.proximal_lambda"),
        ("", "min_devices = 3\n[aggregation]\nstrategy = \"krum\"\n", "aggregation.strategy"),
        ("", "min_devices = 3\n[aggregation]\ntrim_fraction = 0.5\n", "aggregation.trim_fraction"),
        ("", "min_devices = 3\n[aggregation]\nmax_weight_ratio = 0.5\n", "aggregation.max_weight_ratio"),
        ("", "min_devices = 3\n[aggregation]\nmax_update_norm = \"big\"\n", "aggregation.max_update_norm"),
        ("", "min_devices = 3\n[aggregation]\nmax_update_norm = 0\n", "aggregation.max_update_norm"),
        ("", "min_devices = 3\n[aggregation]\nmax_update_norm = 500\n", "aggregation.max_update_norm"),
        ("", "min_devices = 3\n[aggregation]\nnorm_multiplier = 0.9\n", "aggregation.norm_multiplier"),
        ("", "min_devices = 3\n[aggregation]\nnorm_window = -1\n", "aggregation.norm_window"),
        ("", "min_devices = 3\n[aggregation]\nnorm_ceiling = inf\n", "aggregation.norm_ceiling"),
        ("", "min_devices = 1\n[schedule]\nevery_s = -5\n", "schedule.every_s"),
        ("", "min_devices = 1\n[schedule]\nchain_rounds = 1.5\n", "schedule.chain_rounds"),
        ('devices = ["ok", "bad id"]', "", "devices"),
        ('devices = ["a"]', "min_devices = 2\n", "rounds.min_devices"),
        ("colour = 1", "", "colour"),
        ("", "min_devices = 1\n[secagg]\nenabled = \"yes\"\n", "secagg.enabled"),
        ("", "min_devices = 1\n[secagg]\nring_bits = 70\n", "secagg.ring_bits"),
        ("", "min_devices = 1\n[secagg]\ndegree = -2\n", "secagg.degree"),
        ("", "min_devices = 1\n[secagg]\nscale = 0\n", "secagg.scale"),
        ("", "min_devices = 1\n[secagg]\nstage_timeout_s = nan\n", "secagg.stage_timeout_s"),
        ("", "min_devices = 1\n[secagg]\nkeys = 3\n", "secagg.keys"),
        ("", "min_devices = 1\n[secagg]\ndegree = 4\nthreshold = 2\n", "secagg.threshold"),
        ("", "min_devices = 1\n[secagg]\nring_bits = 8\n", "secagg.scale"),
        ('devices = ["a", "hub"]', "min_devices = 1\n", "devices"),
    ],
)
def test_invalid_fields_are_named(hub_toml: Callable[..., Path], extra: str, rounds: str, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(hub_toml(extra, rounds))
    assert err.value.field == field


def test_bad_fleet_and_missing_broker(tmp_path: Path, artifacts: Path) -> None:
    path = tmp_path / "hub.toml"
    path.write_text(f'fleet = "a/b"\nartifacts = "{artifacts}"\n[broker]\nurl = "embedded"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.field == "fleet"
    path.write_text(f'fleet = "a"\nartifacts = "{artifacts}"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.field == "broker.url"
    path.write_text(f'fleet = "a"\nartifacts = "{artifacts}"\n[broker]\nurl = "ftp://x"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.field.startswith("broker")
