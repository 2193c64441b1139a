"""Full rounds on the in-memory broker: announce → updates → close → new head → result."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from fedge.hub.registry import head_sha256
from fedge.protocol.codec import encode
from fedge.protocol.manifest import load_head
from fedge.protocol.messages import (
    Ack,
    HubStatus,
    ModelFull,
    ModelHead,
    ModelUpdate,
    Reject,
    RejectReason,
    RoundAnnounce,
    RoundStatus,
)
from tests.hub.fleet import SHAPES, TOPICS, Fleet, hub_config, iter_hub, run_hub, zero_delta


@pytest.fixture
def fleet(tmp_path: Path, artifacts: Path) -> Iterator[Fleet]:
    # plain FedAvg arithmetic: bounds loose enough not to bite (tests/hub/test_robust_rounds.py tests them)
    loose = {"proximal_lambda": 0.0, "norm_multiplier": 4.0, "max_weight_share": 1.0}
    yield from run_hub(hub_config(tmp_path / "state", artifacts, aggregation=loose))


def test_startup_publishes_retained_state(fleet: Fleet, artifacts: Path) -> None:
    status = fleet.retained(TOPICS.hub_status)
    assert isinstance(status, HubStatus) and status.online and status.model_version == "v0"
    full = fleet.retained(TOPICS.model_full)
    assert isinstance(full, ModelFull)
    assert set(full.files) == {"backbone.onnx", "head.npz"}
    assert full.files["backbone.onnx"].tobytes() == (artifacts / "backbone.onnx").read_bytes()
    head = fleet.retained(TOPICS.model_head)
    assert isinstance(head, ModelHead) and head.version == "v0" and head.parent is None
    w0 = load_head(artifacts)
    assert head_sha256(head.head) == head_sha256(w0)
    assert TOPICS.announce not in fleet.broker.retained


def test_full_round(fleet: Fleet, artifacts: Path) -> None:
    a, b, c = fleet.device("a"), fleet.device("b"), fleet.device("c")
    for d in (a, b, c):
        d.hello()
    rnd = fleet.start_round()
    assert rnd.round == 1 and rnd.model_version == "v0" and rnd.selected == ("a", "b", "c")
    assert rnd.min_devices == 2 and rnd.deadline == pytest.approx(fleet.clock.t + 30)
    full_before = fleet.broker.retained[TOPICS.model_full]
    da, db, dc = zero_delta(SHAPES, 1.0), zero_delta(SHAPES, 2.0), zero_delta(SHAPES, -1.0)
    ua = a.update(rnd, da, n=10)
    b.update(rnd, db, n=30)
    assert fleet.results == []  # c has not answered, deadline not reached
    c.update(rnd, dc, n=60)
    assert isinstance(a.inbox[-1], Ack) and a.inbox[-1].ref_nonce == ua.nonce
    # all selected answered: closed at once
    [res] = fleet.results
    assert res.status is RoundStatus.COMPLETED and res.model_version == "v1"
    assert res.devices == ("a", "b", "c") and res.n_samples == 100 and res.rejected == 0
    head = fleet.retained(TOPICS.model_head)
    assert isinstance(head, ModelHead) and head.version == "v1" and head.parent == "v0" and head.round == 1
    w0 = load_head(artifacts)
    for k in SHAPES:
        got = np.asarray(head.head[k], np.float64)
        np.testing.assert_allclose(got, w0[k] + (10 * 1 + 30 * 2 + 60 * -1) / 100, rtol=1e-6)
    assert fleet.broker.retained[TOPICS.model_full] == full_before  # backbone unchanged: not republished
    assert TOPICS.announce not in fleet.broker.retained
    [line] = fleet.jsonl()
    assert line["round"] == 1 and line["status"] == "completed" and line["devices"] == 3
    assert line["model_version"] == "v1" and line["n_samples"] == 100
    # no hub eval data: no score (the devices' own training losses are not a held-out score)
    assert line["loss"] is None and line["accuracy"] is None
    # a second round starts from v1
    assert fleet.start_round().model_version == "v1"


def test_deadline_closes_round_with_quorum(fleet: Fleet) -> None:
    for name in "abc":
        fleet.device(name).hello()
    rnd = fleet.start_round()
    fleet.device("a").update(rnd, zero_delta(SHAPES, 1.0))
    fleet.device("b").update(rnd, zero_delta(SHAPES, 1.0))
    fleet.advance(29)
    assert fleet.results == []
    fleet.advance(2)
    [res] = fleet.results
    assert res.status is RoundStatus.COMPLETED and res.devices == ("a", "b")
    assert res.seconds == pytest.approx(31)


def test_quorum_failure_makes_no_version(fleet: Fleet) -> None:
    for name in "ab":
        fleet.device(name).hello()
    rnd = fleet.start_round(deadline_s=5.0)
    fleet.device("a").update(rnd, zero_delta(SHAPES, 1.0))
    fleet.advance(6)
    [res] = fleet.results
    assert res.status is RoundStatus.FAILED_QUORUM and res.model_version is None
    head = fleet.retained(TOPICS.model_head)
    assert isinstance(head, ModelHead) and head.version == "v0"
    assert fleet.hub.registry.current().version == "v0"  # type: ignore[union-attr]
    assert fleet.jsonl()[0]["status"] == "failed_quorum"


def test_control_while_open_and_malformed_control_are_counted(fleet: Fleet) -> None:
    for name in "ab":
        fleet.device(name).hello()
    rnd = fleet.start_round()
    fleet.control(b"{}")
    fleet.control(b"not json")
    fleet.control(b'{"fraction": 7}')
    assert fleet.announce().round == rnd.round
    assert fleet.hub.store.control_counts() == {"malformed": 2, "round_open": 1}


def test_fraction_sampling_is_seeded(tmp_path: Path, artifacts: Path) -> None:
    picks = []
    for i in range(2):
        gen = iter_hub(hub_config(tmp_path / f"s{i}", artifacts, rounds={"fraction": 0.3, "min_devices": 1}))
        fleet = next(gen)
        for j in range(10):
            fleet.device(f"d{j}").hello()
        picks.append(fleet.start_round().selected)
        gen.close()
    assert picks[0] == picks[1] and len(picks[0]) == 3


NAN3 = np.array([0, np.nan, 0], np.float32)


def _with(name: str, arr: np.ndarray) -> dict[str, np.ndarray]:
    return {**zero_delta(SHAPES), name: arr}


BAD: list[tuple[RejectReason, Callable[[Fleet, RoundAnnounce, dict[str, str]], object]]] = [
    (RejectReason.MALFORMED, lambda f, r, n: f.device(n["x"]).send(b"FDG\x01garbage")),
    (RejectReason.TOO_LARGE, lambda f, r, n: f.device(n["x"]).send(b"\0" * 5000)),
    (RejectReason.BAD_VERSION, lambda f, r, n: f.device(n["x"]).send(b"FDG\x09" + b"\0" * 20)),
    (RejectReason.WRONG_TYPE, lambda f, r, n: f.device(n["x"]).send(encode(r))),
    (RejectReason.DEVICE_MISMATCH, lambda f, r, n: f.device(n["x"]).update(r, zero_delta(SHAPES), device=n["other"])),
    (RejectReason.UNKNOWN_DEVICE, lambda f, r, n: f.device("ghost").update(r, zero_delta(SHAPES))),
    (RejectReason.STALE_ROUND, lambda f, r, n: f.device(n["x"]).update(r, zero_delta(SHAPES), round=r.round - 1)),
    (RejectReason.NOT_SELECTED, lambda f, r, n: f.device(n["y"]).update(r, zero_delta(SHAPES))),
    (RejectReason.WRONG_MODEL, lambda f, r, n: f.device(n["x"]).update(r, zero_delta(SHAPES), model_version="v9")),
    (RejectReason.WRONG_SHAPE, lambda f, r, n: f.device(n["x"]).update(r, {"h0_kernel": np.zeros((6, 4), np.float32)})),
    (RejectReason.WRONG_SHAPE, lambda f, r, n: f.device(n["x"]).update(r, _with("h1_bias", np.zeros(4, np.float32)))),
    (RejectReason.WRONG_DTYPE, lambda f, r, n: f.device(n["x"]).update(r, _with("h1_bias", np.zeros(3)))),
    (RejectReason.NOT_FINITE, lambda f, r, n: f.device(n["x"]).update(r, _with("h1_bias", NAN3))),
    (RejectReason.BAD_SAMPLES, lambda f, r, n: f.device(n["x"]).update(r, zero_delta(SHAPES), n=0)),
    (RejectReason.BAD_SAMPLES, lambda f, r, n: f.device(n["x"]).update(r, zero_delta(SHAPES), n=10**12)),
]


def test_every_reject_reason_is_sent_and_counted_and_the_round_completes(tmp_path: Path, artifacts: Path) -> None:
    cfg = hub_config(tmp_path / "state", artifacts, rounds={"max_update_bytes": 4096, "fraction": 0.75},
                     devices=["a", "b", "c", "d"])
    gen = iter_hub(cfg)
    fleet = next(gen)
    rnd = fleet.start_round()
    assert len(rnd.selected) == 3
    [y] = {"a", "b", "c", "d"} - set(rnd.selected)
    names = {"x": rnd.selected[0], "other": rnd.selected[1], "y": y}
    expected: dict[str, int] = {}
    for reason, act in BAD:
        act(fleet, rnd, names)
        expected[str(reason)] = expected.get(str(reason), 0) + 1
    assert fleet.results == []
    for d in rnd.selected:  # x's earlier bad updates were rejected, not stored: its good one is accepted
        fleet.device(d).update(rnd, zero_delta(SHAPES, 0.5))
    assert fleet.hub.store.reject_counts() == expected
    x_reasons = {str(m.reason) for m in fleet.device(names["x"]).inbox if isinstance(m, Reject)}
    assert x_reasons == set(expected) - {"unknown_device", "not_selected"}
    assert [getattr(m, "reason", None) for m in fleet.device("ghost").inbox] == [RejectReason.UNKNOWN_DEVICE]
    assert [getattr(m, "reason", None) for m in fleet.device(y).inbox] == [RejectReason.NOT_SELECTED]
    assert isinstance(fleet.device(names["x"]).inbox[-1], Ack)
    [res] = fleet.results
    assert res.status is RoundStatus.COMPLETED and res.rejected == len(BAD)
    assert set(res.devices) == set(rnd.selected)
    # after the round: no open round
    fleet.device(names["x"]).update(rnd, zero_delta(SHAPES))
    assert fleet.hub.store.reject_counts()["no_open_round"] == 1
    gen.close()


def test_duplicate_and_redelivery(fleet: Fleet) -> None:
    for name in "abc":
        fleet.device(name).hello()
    rnd = fleet.start_round()
    a = fleet.device("a")
    first = a.update(rnd, zero_delta(SHAPES, 1.0), n=10)
    a.send(encode(first))  # redelivery: same nonce
    a.update(rnd, zero_delta(SHAPES, 5.0), n=10)  # a different update: duplicate
    assert [type(m).__name__ for m in a.inbox] == ["Ack", "Ack", "Reject"]
    assert isinstance(a.inbox[2], Reject) and a.inbox[2].reason is RejectReason.DUPLICATE
    assert fleet.hub.round is not None and fleet.hub.round.aggregator.count == 1
    fleet.device("b").update(rnd, zero_delta(SHAPES, 3.0), n=10)
    fleet.advance(31)
    [res] = fleet.results
    assert res.n_samples == 20 and res.rejected == 1
    head = fleet.retained(TOPICS.model_head)
    v0 = fleet.hub.registry.load_head("v0")
    assert isinstance(head, ModelHead)
    np.testing.assert_allclose(np.asarray(head.head["h1_bias"], np.float64), v0["h1_bias"] + 2.0, rtol=1e-6)


def test_presence_from_other_fleet_or_topic_is_ignored(fleet: Fleet) -> None:
    from fedge.protocol.messages import Presence

    t = fleet.device("a").transport
    t.publish(TOPICS.presence("a"), encode(Presence(fleet="f1", device="b", online=True)))
    t.publish(TOPICS.presence("a"), encode(Presence(fleet="other", device="a", online=True)))
    t.publish(TOPICS.presence("a"), b"junk")
    assert fleet.hub.known == set()
    fleet.device("a").hello()
    assert fleet.hub.known == {"a"}
    assert isinstance(ModelUpdate, type)


def test_chain_rounds_follow_each_other_up_to_r(tmp_path: Path, artifacts: Path) -> None:
    gen = iter_hub(hub_config(tmp_path / "state", artifacts, rounds={"min_devices": 1}, schedule={"chain_rounds": 3}))
    fleet = next(gen)
    fleet.device("a").hello()
    rnd = fleet.start_round()
    for expected in (1, 2, 3):
        assert rnd.round == expected
        fleet.device("a").update(rnd, zero_delta(SHAPES, 1.0))
        if expected < 3:
            rnd = fleet.announce()
    assert [r.round for r in fleet.results] == [1, 2, 3]
    assert TOPICS.announce not in fleet.broker.retained and fleet.hub.round is None
    assert fleet.retained(TOPICS.model_head).version == "v3"  # type: ignore[union-attr]
    gen.close()


def test_every_s_schedule_starts_rounds(tmp_path: Path, artifacts: Path) -> None:
    gen = iter_hub(hub_config(tmp_path / "state", artifacts, rounds={"min_devices": 1, "deadline_s": 5},
                              schedule={"every_s": 60}))
    fleet = next(gen)
    fleet.hub.tick()
    assert fleet.hub.round is None  # nobody online yet
    fleet.device("a").hello()
    fleet.hub.tick()
    assert fleet.announce().round == 1
    fleet.advance(6)
    assert [r.status for r in fleet.results] == [RoundStatus.FAILED_QUORUM]
    fleet.advance(30)
    assert fleet.hub.round is None
    fleet.advance(30)
    assert fleet.announce().round == 2
    gen.close()


def test_rollback_is_published_at_next_round(fleet: Fleet) -> None:
    fleet.device("a").hello()
    fleet.device("b").hello()
    rnd = fleet.start_round()
    fleet.device("a").update(rnd, zero_delta(SHAPES, 1.0))
    fleet.device("b").update(rnd, zero_delta(SHAPES, 1.0))
    assert fleet.retained(TOPICS.model_head).version == "v1"  # type: ignore[union-attr]
    row = fleet.hub.registry.rollback("v0")
    assert (row.version, row.parent) == ("v2", "v1"), "a rollback is a new version: versions only move forward"
    assert fleet.start_round().model_version == "v2"
    head = fleet.retained(TOPICS.model_head)
    assert isinstance(head, ModelHead) and head.version == "v2"
    v0 = fleet.hub.registry.load_head("v0")
    assert all(np.array_equal(head.head[k], v0[k]) for k in v0), "v2 is v0's head"


def test_a_compressed_round_decodes_codes_aggregates_them_and_refuses_floats(tmp_path: Path, artifacts: Path) -> None:
    """Issue 22: with ``[rounds] compression = "int4"`` the announce says so; an update's codes are decoded to float32
    before validation and aggregation (the new head is what the decoded deltas make); a float update, or hostile
    codes, are refused as malformed; the hub resumes a compressed round from its stored frames."""
    from fedge.core.compress import compress, decompress
    from fedge.protocol.messages import Reject
    from tests.hub.fleet import SHAPES, hub_config, zero_delta

    cfg = hub_config(tmp_path / "state", artifacts, rounds={"min_devices": 2, "compression": "int4", "over_select": 0},
                     aggregation={"proximal_lambda": 0.0, "norm_multiplier": 4.0, "max_weight_share": 1.0})
    first = Fleet(cfg)
    first.hub.start()
    for d in "abc":
        first.device(d).hello()
    rnd = first.start_round()
    assert rnd.compression == "int4"
    rng = np.random.default_rng(0)
    deltas = {d: {k: rng.normal(size=s).astype(np.float32) * 0.01 for k, s in SHAPES.items()} for d in "ab"}
    codes = {d: compress(deltas[d], "int4", np.random.default_rng(1))[0] for d in "ab"}
    first.device("c").update(rnd, zero_delta(SHAPES, 0.1))  # float32: refused in a compressed round
    rej = first.device("c").inbox[-1]
    assert isinstance(rej, Reject) and rej.reason == "malformed" and "int4" in rej.detail
    first.device("a").update(rnd, codes["a"], n=10)
    first.hub.halt()  # crash with a's codes stored: they are decoded again at resume
    second = Fleet(cfg, broker=first.broker)
    second.clock.t = first.clock.t + 1
    second.hub.start()
    second.device("b").update(rnd, codes["b"], n=30)
    second.advance(60)
    head = second.retained(TOPICS.model_head)
    assert isinstance(head, ModelHead) and head.version == "v1"
    v0 = second.hub.registry.load_head("v0")
    for k in SHAPES:
        sent = {d: decompress(codes[d], SHAPES, "int4")[k] for d in "ab"}
        expected = v0[k] + (10 * sent["a"].astype(np.float64) + 30 * sent["b"]) / 40
        np.testing.assert_allclose(head.head[k], expected, rtol=1e-5, atol=1e-7)
    second.hub.stop()
