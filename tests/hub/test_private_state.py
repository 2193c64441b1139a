"""The hub's state is private, crash-safe and keeps no raw update after its round (issue 12, item 5): folders
0700 and files 0600 (hub.sqlite and its -wal/-shm too), head files fsynced with their folders before the commit
that names them, update frames dropped when their round closes unless ``[store] keep_update_payloads``."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.hub.config import config_from_mapping
from fedge.hub.registry import Registry
from fedge.hub.store import Store
from fedge.protocol.errors import ConfigError
from fedge.protocol.messages import RoundStatus
from tests.hub.fleet import SHAPES, Fleet, hub_config, run_hub


def secret_delta(seed: int) -> dict[str, np.ndarray]:
    """A delta whose bytes appear nowhere else (small values: the aggregate stays finite)."""
    rng = np.random.default_rng(seed)
    return {k: (rng.random(s) * 1e-3 + 1e-4).astype(np.float32) for k, s in SHAPES.items()}


def run_one_round(fleet: Fleet) -> list[bytes]:
    """Two devices, one round to completion; returns the raw delta bytes each sent."""
    for name in ("d1", "d2"):
        fleet.device(name).hello()
    ann = fleet.start_round()
    sent = []
    for i, name in enumerate(("d1", "d2")):
        delta = secret_delta(i)
        fleet.device(name).update(ann, delta)
        sent.append(delta["h0_kernel"].tobytes())
    assert fleet.results and fleet.results[-1].status == RoundStatus.COMPLETED
    return sent


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


def fleet_for(state_dir: Path, artifacts: Path, **sections: Any) -> Iterator[Fleet]:
    return run_hub(hub_config(state_dir, artifacts, **sections))


def stored_payload_sizes(state_dir: Path) -> list[int]:
    store = Store(state_dir / "hub.sqlite")
    try:
        return [int(n) for (n,) in store._all("SELECT length(payload) FROM updates ORDER BY rowid")]
    finally:
        store.close()


def everything_in(folder: Path) -> bytes:
    """Every byte of every file under ``folder``."""
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def test_update_frames_are_dropped_when_their_round_closes(state_dir: Path, artifacts: Path) -> None:
    for fleet in fleet_for(state_dir, artifacts):
        sent = run_one_round(fleet)
        assert fleet.hub.store.accepted_nonces(1).keys() == {"d1", "d2"}  # the redelivery check keeps its nonces
        on_disk = everything_in(state_dir)
        for raw in sent:
            assert raw[:64] not in on_disk, "a raw update is still in the hub's state folder after its round"
        assert not (state_dir / "updates" / "round-1.bin").exists()
    assert stored_payload_sizes(state_dir) == [0, 0]


def test_open_round_frames_are_in_a_private_file_until_it_closes(state_dir: Path, artifacts: Path) -> None:
    for fleet in fleet_for(state_dir, artifacts):
        for name in ("d1", "d2"):
            fleet.device(name).hello()
        ann = fleet.start_round()
        delta = secret_delta(7)
        fleet.device("d1").update(ann, delta)
        frames = state_dir / "updates" / f"round-{ann.round}.bin"
        assert delta["h0_kernel"].tobytes() in frames.read_bytes(), "the open round's frame is on disk (for resume)"
        assert stat.S_IMODE(frames.stat().st_mode) == 0o600
        assert stat.S_IMODE(frames.parent.stat().st_mode) == 0o700
        assert stored_payload_sizes(state_dir) == [0], "not in hub.sqlite"
        fleet.device("d2").update(ann, secret_delta(8))
        assert fleet.results and fleet.results[-1].status == RoundStatus.COMPLETED
        assert not frames.exists()


def test_keep_update_payloads_keeps_them(state_dir: Path, artifacts: Path) -> None:
    for fleet in fleet_for(state_dir, artifacts, store={"keep_update_payloads": True}):
        run_one_round(fleet)
    sizes = stored_payload_sizes(state_dir)
    assert len(sizes) == 2 and all(n > 100 for n in sizes)


def test_keep_update_payloads_must_be_a_bool(state_dir: Path, artifacts: Path) -> None:
    table = {"fleet": "f1", "state_dir": str(state_dir), "artifacts": str(artifacts),
             "broker": {"url": "mqtt://127.0.0.1:1883"}, "store": {"keep_update_payloads": "no"}}
    with pytest.raises(ConfigError) as info:
        config_from_mapping(table, state_dir.parent)
    assert info.value.field == "store.keep_update_payloads"


def test_the_hub_state_directory_is_private(state_dir: Path, artifacts: Path) -> None:
    state_dir.mkdir(mode=0o755)
    os.chmod(state_dir, 0o755)
    for fleet in fleet_for(state_dir, artifacts):
        run_one_round(fleet)
        names = {p.name for p in state_dir.iterdir()}
        assert {"hub.sqlite", "hub.sqlite-wal", "hub.sqlite-shm", "rounds.jsonl", "models", "backbones"} <= names
        wrong = {}
        for path in [state_dir, *state_dir.rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode != (0o700 if path.is_dir() else 0o600):
                wrong[str(path.relative_to(state_dir.parent))] = oct(mode)
        assert not wrong, f"not private: {wrong}"


def test_head_files_are_fsynced_before_the_commit_that_names_them(
        state_dir: Path, artifacts: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(state_dir / "hub.sqlite")
    registry = Registry(store, state_dir)
    events: list[tuple[str, str]] = []
    real_fsync, real_add = os.fsync, Store.add_version

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def add_version(self: Store, row: Any, **kw: Any) -> None:
        events.append(("commit", row.version))
        real_add(self, row, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Store, "add_version", add_version)
    try:
        row = registry.import_artifacts(artifacts)
    finally:
        store.close()
    commit = events.index(("commit", row.version))
    synced = {path for kind, path in events[:commit] if kind == "fsync"}
    folder = state_dir.resolve() / "models" / row.version
    # the head's bytes (written to a temporary .head.npz.*.tmp beside it, then renamed), the rename (its folder),
    # the folder's entry
    temps = {p for p in synced if Path(p).parent == folder and Path(p).name.startswith(".head.npz.")
             and p.endswith(".tmp")}
    assert len(temps) == 1 and {str(folder), str(folder.parent)} <= synced, events
    backbones = state_dir.resolve() / "backbones"
    copied = {Path(p).relative_to(backbones).parts[1:] for p in synced if p.startswith(f"{backbones}/")}
    final = {p.relative_to(backbones).parts[1:] for p in backbones.rglob("*")}
    assert final <= copied and str(backbones) in synced, events  # every file and folder copied, and the rename
