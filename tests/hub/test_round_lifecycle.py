"""The round lifecycle on the in-memory broker: bounded overrides, devices that go offline, cancelled rounds, and
the retained state published again after a reconnect (issue 12, items 1, 7 and 8)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import pytest

from fedge.core.rounds import UNBOUNDED_OVERRIDES
from fedge.hub.config import LimitsConfig
from fedge.protocol.codec import decode
from fedge.protocol.control import CancelRequest, encode_cancel
from fedge.protocol.errors import ConfigError
from fedge.protocol.messages import ModelFull, ModelHead, RoundAnnounce, RoundOverrides, RoundStatus
from fedge.protocol.transport import InMemoryTransport
from tests.hub.fleet import SHAPES, TOPICS, Fleet, hub_config, iter_hub, run_hub, zero_delta


@pytest.fixture
def fleet(tmp_path: Path, artifacts: Path) -> Iterator[Fleet]:
    yield from run_hub(hub_config(tmp_path / "state", artifacts, rounds={"min_devices": 2, "deadline_s": 30},
                                  aggregation={"proximal_lambda": 0.0}))


def _replies(fleet: Fleet) -> list[dict[str, object]]:
    got: list[dict[str, object]] = []
    InMemoryTransport(fleet.broker).subscribe(TOPICS.control_round_reply, lambda _t, p: got.append(json.loads(p)))
    return got


def _cancel(fleet: Fleet, req: CancelRequest | bytes) -> None:
    body = req if isinstance(req, bytes) else encode_cancel(req)
    InMemoryTransport(fleet.broker).publish(TOPICS.control_round_cancel, body)


# -- item 1: bounded work --------------------------------------------------------------------------------------
def test_every_round_override_has_an_upper_bound_in_the_limits() -> None:
    """A new RoundOverrides field needs a limits.max_<field> (or a reason to be in UNBOUNDED_OVERRIDES)."""
    names = {f.name for f in fields(RoundOverrides)} - UNBOUNDED_OVERRIDES
    assert names <= {f.name.removeprefix("max_") for f in fields(LimitsConfig)}


@pytest.mark.parametrize("override", [
    {"local_epochs": 10**12}, {"deadline_s": 1e300}, {"lr": 1e300}, {"min_devices": 10**9},
    {"local_epochs": 51}, {"deadline_s": 3600.5},
])
def test_overrides_above_the_limits_are_refused_with_a_reason(fleet: Fleet, override: dict[str, float]) -> None:
    for name in "ab":
        fleet.device(name).hello()
    replies = _replies(fleet)
    fleet.control(json.dumps({**override, "request_id": "r1"}).encode())
    assert TOPICS.announce not in fleet.broker.retained, "no round was opened"
    (reply,) = replies
    assert reply["accepted"] is False and reply["reason"] == "over_limits" and reply["request_id"] == "r1"
    (name,) = override
    assert f"limits.max_{name}" in str(reply["detail"])
    assert fleet.hub.store.control_counts() == {"over_limits": 1}


def test_overrides_at_the_limits_are_accepted(tmp_path: Path, artifacts: Path) -> None:
    gen = iter_hub(hub_config(tmp_path / "state", artifacts, limits={"max_local_epochs": 3, "max_lr": 0.5}))
    fleet = next(gen)
    for name in "ab":
        fleet.device(name).hello()
    rnd = fleet.start_round(local_epochs=3, lr=0.5)
    assert (rnd.local_epochs, rnd.lr) == (3, 0.5)
    gen.close()


def test_round_defaults_beyond_the_limits_are_a_config_error(tmp_path: Path, artifacts: Path) -> None:
    with pytest.raises(ConfigError) as info:
        hub_config(tmp_path / "state", artifacts, rounds={"deadline_s": 7200})
    assert info.value.field == "rounds.deadline_s" and "max_deadline_s" in str(info.value)
    with pytest.raises(ConfigError) as info:
        hub_config(tmp_path / "state", artifacts, limits={"max_lr": -1})
    assert info.value.field == "limits.max_lr"


def test_a_resumed_round_ends_within_the_limits_of_the_restarted_hub(tmp_path: Path, artifacts: Path) -> None:
    """A round opened with a long deadline is still closed by a hub restarted with a lower max_deadline_s."""
    state = tmp_path / "state"
    gen = iter_hub(hub_config(state, artifacts, rounds={"deadline_s": 3000}))
    fleet = next(gen)
    for name in "ab":
        fleet.device(name).hello()
    fleet.start_round()
    fleet.hub.halt()
    again = Fleet(hub_config(state, artifacts, rounds={"deadline_s": 30}, limits={"max_deadline_s": 60}),
                  broker=fleet.broker)
    again.clock.t = fleet.clock.t
    again.hub.start()
    try:
        assert again.hub.round is not None and again.announce().deadline == pytest.approx(fleet.clock.t + 60)
        again.advance(61)
        assert again.hub.round is None and [r.status for r in again.results] == [RoundStatus.FAILED_QUORUM]
    finally:
        again.hub.stop()


def test_a_chain_keeps_its_overrides_and_a_scheduled_round_does_not_inherit_them(tmp_path: Path,
                                                                              artifacts: Path) -> None:
    gen = iter_hub(hub_config(tmp_path / "state", artifacts, rounds={"min_devices": 1, "deadline_s": 5},
                              schedule={"chain_rounds": 3, "every_s": 100}))
    fleet = next(gen)
    fleet.device("a").hello()
    first = fleet.start_round(local_epochs=4)
    fleet.device("a").update(first, zero_delta(SHAPES, 0.1))
    second = fleet.announce()
    assert (second.round, second.local_epochs) == (2, 4), "a chained round inherits the start's overrides"
    fleet.device("a").hello(online=False)  # its will: the round fails after the grace, the next finds nobody
    fleet.advance(fleet.cfg.rounds.offline_grace_s)
    assert fleet.hub.round is None and [r.status for r in fleet.results][-1] is RoundStatus.FAILED_QUORUM
    fleet.device("a").hello()
    fleet.advance(101)  # the schedule starts a round: hub defaults, and no leftover chain
    third = fleet.announce()
    assert (third.round, third.local_epochs) == (3, 1)
    fleet.device("a").update(third, zero_delta(SHAPES, 0.1))
    assert fleet.hub.round is None, "the broken chain did not resume after the scheduled round"
    gen.close()


# -- item 8: rounds that end when they should -------------------------------------------------------------------
def test_a_selected_device_that_goes_offline_counts_as_failed_and_the_round_closes(fleet: Fleet) -> None:
    for name in "abc":
        fleet.device(name).hello()
    rnd = fleet.start_round()
    assert rnd.selected == ("a", "b", "c")
    fleet.device("a").update(rnd, zero_delta(SHAPES, 1.0))
    fleet.device("b").update(rnd, zero_delta(SHAPES, 1.0))
    assert fleet.results == [], "c has not answered"
    fleet.device("c").hello(online=False)  # c's last will
    assert fleet.results == [], "c may be back within the grace period (a broker restart sends every will)"
    fleet.advance(fleet.cfg.rounds.offline_grace_s)
    (res,) = fleet.results
    assert res.status is RoundStatus.COMPLETED and res.devices == ("a", "b")
    assert res.seconds == fleet.cfg.rounds.offline_grace_s, "closed at the will's grace, not at the deadline"


def test_offline_devices_below_quorum_fail_the_round_at_once(fleet: Fleet) -> None:
    for name in "abc":
        fleet.device(name).hello()
    rnd = fleet.start_round()
    fleet.device("a").update(rnd, zero_delta(SHAPES, 1.0))
    fleet.device("b").hello(online=False)
    assert fleet.results == []
    fleet.device("c").hello(online=False)
    fleet.advance(fleet.cfg.rounds.offline_grace_s)
    (res,) = fleet.results
    assert res.status is RoundStatus.FAILED_QUORUM and res.devices == ("a",)


def test_a_device_back_online_before_the_round_closed_is_awaited_and_counted(fleet: Fleet) -> None:
    for name in "abc":
        fleet.device(name).hello()
    rnd = fleet.start_round()
    fleet.device("c").hello(online=False)
    fleet.advance(fleet.cfg.rounds.offline_grace_s / 2)
    fleet.device("c").hello()
    fleet.advance(fleet.cfg.rounds.offline_grace_s)
    fleet.device("a").update(rnd, zero_delta(SHAPES, 1.0))
    fleet.device("b").update(rnd, zero_delta(SHAPES, 1.0))
    assert fleet.results == [], "c came back: the round waits for it again"
    fleet.device("c").update(rnd, zero_delta(SHAPES, 1.0))
    (res,) = fleet.results
    assert res.devices == ("a", "b", "c")


def test_cancel_closes_the_open_round_with_a_reason(fleet: Fleet) -> None:
    for name in "ab":
        fleet.device(name).hello()
    replies = _replies(fleet)
    rnd = fleet.start_round(deadline_s=3000)
    fleet.device("a").update(rnd, zero_delta(SHAPES, 1.0))
    _cancel(fleet, CancelRequest("wrong data set", round=rnd.round, request_id="c1"))
    (res,) = fleet.results
    assert res.status is RoundStatus.CANCELLED and res.model_version is None
    assert res.detail is not None and "wrong data set" in res.detail
    assert TOPICS.announce not in fleet.broker.retained and fleet.hub.round is None
    assert fleet.hub.registry.current().version == "v0"  # type: ignore[union-attr]
    assert replies[-1] == {"request_id": "c1", "accepted": True, "round": rnd.round, "reason": "cancelled",
                           "detail": res.detail}
    assert fleet.jsonl()[-1]["status"] == "cancelled"
    # a new round can start at once
    assert fleet.start_round().round == rnd.round + 1


def test_cancel_without_an_open_round_or_of_another_round_is_refused(fleet: Fleet) -> None:
    for name in "ab":
        fleet.device(name).hello()
    replies = _replies(fleet)
    _cancel(fleet, CancelRequest(request_id="x1"))
    rnd = fleet.start_round()
    _cancel(fleet, CancelRequest(round=rnd.round + 5, request_id="x2"))
    _cancel(fleet, b'{"reason": 5}')
    _cancel(fleet, b'{"reason": "a", "reason": "b"}')
    assert [(r["request_id"], r["reason"]) for r in replies if r["reason"] != "started"] == [
        ("x1", "no_open_round"), ("x2", "no_open_round"), (None, "malformed"), (None, "malformed")]
    assert fleet.hub.round is not None and fleet.results == []


def test_cancel_ends_a_chain(tmp_path: Path, artifacts: Path) -> None:
    gen = iter_hub(hub_config(tmp_path / "state", artifacts, rounds={"min_devices": 1}, schedule={"chain_rounds": 5}))
    fleet = next(gen)
    fleet.device("a").hello()
    fleet.start_round()
    _cancel(fleet, CancelRequest("stop"))
    assert fleet.hub.round is None and [r.status for r in fleet.results] == [RoundStatus.CANCELLED]
    gen.close()


def test_a_cancelled_dp_round_keeps_its_privacy_charge(tmp_path: Path, artifacts: Path) -> None:
    privacy = {"mode": "central", "noise_multiplier": 1.0, "clip": 1.0, "sample_rate": 1.0, "delta": 1e-5}
    gen = iter_hub(hub_config(tmp_path / "state", artifacts, privacy=privacy, rounds={"min_devices": 1}))
    fleet = next(gen)
    fleet.device("a").hello()
    fleet.start_round()
    spent = fleet.hub.epsilon_spent()
    assert spent > 0
    _cancel(fleet, CancelRequest("oops"))
    (res,) = fleet.results
    assert res.status is RoundStatus.CANCELLED and res.epsilon is not None and res.epsilon > 0
    assert "privacy charge stays in the ledger" in (res.detail or "")
    assert [r.round for r in fleet.hub.store.ledger()] == [1] and fleet.hub.epsilon_spent() == spent
    gen.close()


# -- item 7: the hub publishes its retained state again after a reconnect -----------------------------------------
def test_after_a_reconnect_the_hub_republishes_every_retained_message(fleet: Fleet) -> None:
    for name in "ab":
        fleet.device(name).hello()
    rnd = fleet.start_round()
    fleet.broker.retained.clear()  # a broker restarted without persistence
    fleet.hub.on_connect()  # the first connection: start() already published
    fleet.hub.on_connect()  # a reconnect
    fleet.hub.call(lambda: None)  # the republish was queued on the worker
    assert isinstance(fleet.retained(TOPICS.model_full), ModelFull)
    head = fleet.retained(TOPICS.model_head)
    assert isinstance(head, ModelHead) and head.version == "v0"
    again = fleet.retained(TOPICS.announce)
    assert isinstance(again, RoundAnnounce) and again.round == rnd.round and again.selected == rnd.selected
    status = decode(fleet.broker.retained[TOPICS.hub_status])
    assert getattr(status, "online", None) is True and getattr(status, "round", None) == rnd.round
