"""Source-model selection on the hub: ranking, the control body, and a selection round over the in-memory broker
(candidates published, reports checked and recorded, the winner deployed as the new w0)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedge.core.selection import history_problem, report_weights, score_in_range
from fedge.hub.registry import Registry
from fedge.hub.selection import rank, selection_status
from fedge.protocol.codec import decode, encode, encode_control
from fedge.protocol.errors import DecodeError
from fedge.protocol.messages import ModelFull, ModelUpdate, Reject, RoundAnnounce, RoundOverrides, RoundStatus
from fedge.protocol.selection import SelectRequest, decode_select_control, encode_select_control
from fedge.protocol.transport import InMemoryTransport
from tests.hub.fleet import FLEET, TOPICS, Fleet, hub_config, make_artifacts, run_hub


def test_rank_counts_a_missing_score_as_zero_and_weighs_validation_rows() -> None:
    reports = [{"val_n": 10.0, "val_acc_b": 0.6, "val_loss_b": 0.9}]  # could not score a
    b, a = rank(["a", "b"], reports)
    assert (b.name, b.accuracy, a.accuracy, a.loss, a.val_n, b.val_n) == ("b", 0.6, 0.0, None, 0, 10)
    # eight devices: the lowest and highest dropped, the rest weighted by val_n (none above a quarter of them)
    accs = [0.1, 0.5, 0.5, 0.6, 0.7, 0.7, 0.8, 0.95]
    rows = [20.0, 10.0, 25.0, 20.0, 20.0, 10.0, 20.0, 40.0]
    reports = [{"val_n": n, "val_acc_a": x, "val_loss_a": 1 - x} for x, n in zip(accs, rows, strict=True)]
    [a] = rank(["a"], reports)
    kept = list(zip(accs, rows, strict=True))[1:-1]
    assert a.accuracy == pytest.approx(sum(x * n for x, n in kept) / sum(n for _, n in kept), abs=1e-6)
    assert a.val_n == 165


def test_one_device_claiming_a_huge_validation_set_does_not_decide_the_ranking() -> None:
    honest = [{"val_n": 100.0, "val_acc_a": 0.9, "val_acc_b": 0.3} for _ in range(4)]
    liar = {"val_n": 1e12, "val_acc_a": 0.0, "val_acc_b": 1.0}
    a, b = rank(["a", "b"], [*honest, liar])
    assert a.name == "a", (a, b)  # a plain weighted mean would make b 1.0 and a 0.0 (4 x median: b 0.65, a 0.45)
    assert (a.accuracy, b.accuracy) == (0.9, 0.3)  # the liar is an extreme value: dropped
    # out-of-range scores count for nothing, a liar in the middle weighs at most a share of the kept reports
    mid = {"val_n": 1e12, "val_acc_a": 0.5, "val_acc_b": 7.0}
    spread = [{"val_n": 100.0, "val_acc_a": x, "val_acc_b": 0.3} for x in (0.2, 0.4, 0.6, 0.8)]
    a, b = rank(["a", "b"], [*spread, mid])
    assert a.accuracy == pytest.approx(0.5, abs=1e-6) and b.accuracy == pytest.approx(0.3)


def test_report_weights_cap_at_the_median_and_at_what_a_device_said_before() -> None:
    rows = [{"val_n": 10.0}, {"val_n": 12.0}, {"val_n": 1e9}]
    assert report_weights(rows) == [10.0, 12.0, 48.0]
    assert report_weights(rows, caps=[None, 5.0, 11.0]) == [10.0, 5.0, 11.0]


def test_a_report_that_contradicts_the_devices_earlier_one_is_named() -> None:
    earlier = {"val_n": 48.0, "val_acc_global": 0.625}
    assert history_problem({"val_n": 48.0, "val_acc_v3": 0.7}, earlier) is None
    assert "validation rows" in (history_problem({"val_n": 1e9}, earlier) or "")
    same = {"val_acc_v2": "val_acc_global"}  # the deployed head, scored again in the evaluation round
    assert history_problem({"val_n": 48.0, "val_acc_v2": 0.625}, earlier, same) is None
    assert "scored the same head" in (history_problem({"val_n": 48.0, "val_acc_v2": 0.0}, earlier, same) or "")
    assert history_problem({"val_n": 1e9}, None) is None
    # one validation row may flip (a back-end's last bits on a near-tie); two may not; leaving the score out may not
    assert history_problem({"val_n": 48.0, "val_acc_v2": 0.625 + 1 / 48}, earlier, same) is None
    assert "scored the same head" in (history_problem({"val_n": 48.0, "val_acc_v2": 0.625 + 2 / 48}, earlier,
                                                      same) or "")
    assert "no val_acc_v2" in (history_problem({"val_n": 48.0, "val_acc_v1": 0.9}, earlier, same) or "")
    assert not score_in_range("val_acc_x", 1.5) and not score_in_range("val_loss_x", -1)
    assert score_in_range("val_loss_x", 9)


def test_rank_breaks_ties_by_loss_then_name() -> None:
    reports = [{"val_n": 5.0, "val_acc_x": 0.8, "val_loss_x": 0.5, "val_acc_y": 0.8, "val_loss_y": 0.4,
                "val_acc_z": 0.8, "val_loss_z": 0.4}]
    assert [c.name for c in rank(["x", "z", "y"], reports)] == ["y", "z", "x"]


def test_select_control_body_round_trips_and_refuses_bad_candidates() -> None:
    from fedge.protocol.messages import RoundOverrides

    req = SelectRequest(("good", "poor"), RoundOverrides(min_devices=2, local_epochs=1, request_id="r1"))
    assert decode_select_control(encode_select_control(req)) == req
    assert decode_select_control(b"") == SelectRequest()
    for bad in (b'{"candidates": "good"}', b'{"candidates": ["a", "a"]}', b'{"candidates": ["no/slash"]}',
                b'{"candidates": [], "bogus": 1}', b'{"local_epochs": 0}', b"[1]",
                b'{"candidates": ["a"], "candidates": ["b"]}'):
        with pytest.raises(DecodeError) as err:
            decode_select_control(bad)
        assert err.value.reason == "malformed", bad


def _register(fleet: Fleet, tmp_path: Path) -> dict[str, str]:
    registry = Registry(fleet.hub.store, fleet.cfg.state_dir)
    out = {}
    for i, name in enumerate(("good", "poor")):
        art = make_artifacts(tmp_path / f"cand-{name}", seed=10 + i, backbone_bytes=f"backbone {name}".encode())
        sha, _ = registry.add_backbone(art)
        fleet.hub.store.add_candidate(name, sha)
        out[name] = sha
    return out


def _replies(fleet: Fleet) -> list[dict[str, object]]:
    replies: list[dict[str, object]] = []
    InMemoryTransport(fleet.broker).subscribe(TOPICS.control_round_reply, lambda _t, p: replies.append(json.loads(p)))
    return replies


def _select(fleet: Fleet, body: dict[str, object]) -> list[dict[str, object]]:
    replies: list[dict[str, object]] = []
    t = InMemoryTransport(fleet.broker)
    t.subscribe(TOPICS.control_round_reply, lambda _t, p: replies.append(json.loads(p)))
    t.publish(TOPICS.control_round_select, json.dumps(body).encode())
    return replies


def _report(fleet: Fleet, device: str, rnd: int, metrics: dict[str, float], **over: object) -> ModelUpdate:
    kwargs: dict[str, object] = {"fleet": FLEET, "round": rnd, "device": device, "model_version": "v0",
                                 "n_samples": int(metrics.get("val_n", 1)), "delta": {}, "metrics": metrics}
    kwargs.update(over)
    msg = ModelUpdate(**kwargs)  # type: ignore[arg-type]
    fleet.device(device).transport.publish(TOPICS.select_report(device), encode(msg))
    return msg


def test_a_selection_round_ranks_records_and_deploys_the_winner(tmp_path: Path, artifacts: Path) -> None:
    fleet = Fleet(hub_config(tmp_path / "state", artifacts))
    fleet.hub.start()
    try:
        shas = _register(fleet, tmp_path)
        for d in ("a", "b", "c"):
            fleet.device(d).hello()
        (reply,) = _select(fleet, {"candidates": ["good", "poor"], "min_devices": 2, "request_id": "q1"})
        assert reply["accepted"] and reply["reason"] == "started", reply
        rid = reply["round"]
        ann = fleet.retained(TOPICS.select_announce)
        assert isinstance(ann, RoundAnnounce) and ann.round == rid
        assert ann.candidates == ("good", "poor") and ann.candidate_backbones == (shas["good"], shas["poor"])
        assert fleet.retained(TOPICS.announce) is None, "no federated round is announced"
        for name in ("good", "poor"):  # every candidate's artifacts, retained while the round is open
            full = fleet.retained(TOPICS.candidate(name))
            assert isinstance(full, ModelFull) and full.backbone_sha256 == shas[name]
        # a federated round cannot start while the selection round is open
        (busy,) = _select(fleet, {"candidates": ["good"]})
        assert busy["reason"] == "round_open"
        fleet.control(b'{"request_id": "q2"}')
        assert fleet.hub.round is None

        _report(fleet, "a", rid, {"val_n": 10.0, "val_acc_good": 0.8, "val_loss_good": 0.5,
                                  "val_acc_poor": 0.2, "val_loss_poor": 2.0})
        # hostile or wrong reports are rejected, counted, and change nothing
        _report(fleet, "a", rid, {"val_n": 10.0, "val_acc_good": 0.1})  # a second, different report: duplicate
        _report(fleet, "b", rid, {"val_n": 10.0, "val_acc_good": 1.5})  # accuracy outside [0, 1]
        _report(fleet, "b", rid, {"val_n": 10.0}, delta={"w": np.zeros(2, np.float32)})  # weights: not allowed
        _report(fleet, "b", rid + 1, {"val_n": 10.0})  # another round
        reasons = [m.reason for d in ("a", "b") for m in fleet.device(d).inbox if isinstance(m, Reject)]
        assert sorted(map(str, reasons)) == ["duplicate", "malformed", "malformed", "stale_round"]
        assert fleet.hub.selector.open is not None
        _report(fleet, "b", rid, {"val_n": 30.0, "val_acc_good": 0.6, "val_loss_good": 0.9,
                                  "val_acc_poor": 0.3, "val_loss_poor": 1.9})
        if "c" in ann.selected:
            _report(fleet, "c", rid, {"val_n": 5.0, "val_acc_good": 0.7, "val_acc_poor": 0.1})
        assert fleet.hub.selector.open is None, "every selected device answered: the round closed"

        res = fleet.results[-1]
        assert res.round == rid and res.status is RoundStatus.COMPLETED
        assert res.ranking == ("good", "poor")
        assert res.federated["val_acc_good"] > res.federated["val_acc_poor"]
        new = res.model_version
        assert new is not None and fleet.hub.registry.current().version == new  # type: ignore[union-attr]
        row = fleet.hub.store.version(new)
        assert row is not None and row.backbone_sha256 == shas["good"] and row.round == rid and row.parent == "v0"
        # the winner is the new w0: published as model/full + model/head, its head is the candidate's
        full = fleet.retained(TOPICS.model_full)
        assert isinstance(full, ModelFull) and full.backbone_sha256 == shas["good"]
        assert fleet.heads[-1].version == new and fleet.heads[-1].backbone_sha256 == shas["good"]
        w0 = fleet.hub.registry.w0(shas["good"])
        good_head = fleet.hub.registry.load_head(new)
        assert all(np.array_equal(w0[k], good_head[k]) for k in w0)
        # cleared: no candidate or selection announce stays retained
        assert fleet.retained(TOPICS.select_announce) is None
        assert all(fleet.retained(TOPICS.candidate(n)) is None for n in shas)
        status = selection_status(fleet.hub.store)
        (sel,) = status["selections"]
        assert sel["winner"] == "good" and sel["new_version"] == new and sel["round"] == rid
        assert [r["name"] for r in sel["ranking"]] == ["good", "poor"]
        # round ids are shared: the next federated round gets the next id, over the new backbone
        ann2 = fleet.start_round(min_devices=1)
        assert ann2.round == rid + 1 and ann2.backbone_sha256 == shas["good"] and ann2.model_version == new
    finally:
        fleet.hub.stop()


def test_selection_without_quorum_fails_and_deploys_nothing(tmp_path: Path, artifacts: Path) -> None:
    fleet = Fleet(hub_config(tmp_path / "state", artifacts))
    fleet.hub.start()
    try:
        _register(fleet, tmp_path)
        for d in ("a", "b"):
            fleet.device(d).hello()
        (reply,) = _select(fleet, {"min_devices": 2, "deadline_s": 10})
        _report(fleet, "a", int(reply["round"]), {"val_n": 10.0, "val_acc_good": 0.8, "val_acc_poor": 0.2})  # type: ignore[call-overload]
        fleet.advance(11)
        res = fleet.results[-1]
        assert res.status is RoundStatus.FAILED_QUORUM and res.model_version is None and res.ranking == ()
        assert fleet.hub.registry.current().version == "v0"  # type: ignore[union-attr]
    finally:
        fleet.hub.stop()


def test_selection_is_refused_under_dp_and_for_unknown_candidates(tmp_path: Path, artifacts: Path) -> None:
    fleet = Fleet(hub_config(tmp_path / "state", artifacts,
                             privacy={"mode": "central", "noise_multiplier": 1.0, "clip": 1.0, "sample_rate": 1.0}))
    fleet.hub.start()
    try:
        _register(fleet, tmp_path)
        fleet.device("a").hello()
        (dp,) = _select(fleet, {})
        assert not dp["accepted"] and dp["reason"] == "dp_not_supported", dp
        assert "clear" in str(dp["detail"])
        (unknown,) = _select(fleet, {"candidates": ["nope"]})
        assert unknown["reason"] in ("dp_not_supported", "unknown_candidate")
        assert fleet.hub.selector.open is None and fleet.retained(TOPICS.select_announce) is None
    finally:
        fleet.hub.stop()


def test_unknown_candidates_and_an_empty_registry_are_refused(tmp_path: Path, artifacts: Path) -> None:
    fleet = Fleet(hub_config(tmp_path / "state", artifacts))
    fleet.hub.start()
    try:
        fleet.device("a").hello()
        (empty,) = _select(fleet, {})
        assert empty["reason"] == "no_candidates"
        (bad,) = _select(fleet, {"candidates": "good", "request_id": "bad1"})  # refused, still answered by id
        assert (bad["reason"], bad["request_id"]) == ("malformed", "bad1")
        _register(fleet, tmp_path)
        (unknown,) = _select(fleet, {"candidates": ["good", "nope"]})
        assert unknown["reason"] == "unknown_candidate" and "nope" in str(unknown["detail"])
        (excess,) = _select(fleet, {"local_epochs": 10_000})  # the hub's [limits] hold for selection rounds too
        assert excess["reason"] == "over_limits"
        assert fleet.hub.store.control_counts() == {"no_candidates": 1, "unknown_candidate": 1, "over_limits": 1,
                                                    "malformed": 1}
    finally:
        fleet.hub.stop()


def test_decoding_the_selection_announce_keeps_plain_announces_byte_identical() -> None:
    plain = RoundAnnounce(fleet=FLEET, round=1, model_version="v0", backbone_sha256="ab" * 32, deadline=1.0,
                          min_devices=1, selected=("a",), local_epochs=1, lr=0.1, nonce="00" * 16, ts=1.0)
    assert b"candidates" not in encode(plain)
    sel = RoundAnnounce(**{**plain.__dict__, "candidates": ("x",), "candidate_backbones": ("cd" * 32,)})
    back = decode(encode(sel))
    assert isinstance(back, RoundAnnounce) and back.candidates == ("x",)


# (per device: validation rows, deployed head's accuracy, candidate's accuracy), whether the candidate deploys
GATE_CASES = [
    ([(10.0, 0.6, 0.58), (10.0, 0.6, 0.58)], True),  # within the tolerance
    ([(10.0, 0.6, 0.40), (10.0, 0.6, 0.40)], False),  # worse by more than the tolerance
    ([(1000.0, 0.7, 0.7), (10.0, 0.3, 0.3)], True),  # a tie, with one device claiming 100x the rows (capped)
]


@pytest.mark.parametrize("devices,deployed", GATE_CASES)
def test_the_federated_gate_deploys_only_a_version_the_devices_validate(
        tmp_path: Path, artifacts: Path, devices: list[tuple[float, float, float]], deployed: bool) -> None:
    """The evaluation round scores the candidate and the deployed head on the same rows with the same (capped)
    weights, so a tie deploys (issue 20: the old gate compared the candidate's capped-weight score with the
    deployed head's uncapped score from the round, and refused the tie in the third case)."""
    from fedge.protocol.messages import ModelHead
    from tests.hub.fleet import SHAPES, zero_delta

    cfg = hub_config(tmp_path / "state", artifacts, aggregation={"federated_gate": True, "deploy_tolerance": 0.05},
                     schedule={"chain_rounds": 2})
    fleet = Fleet(cfg)
    fleet.hub.start()
    try:
        for d in ("a", "b"):
            fleet.device(d).hello()
        rnd = fleet.start_round()
        scores = dict(zip(sorted(rnd.selected), devices, strict=True))
        for d in rnd.selected:  # the devices score the head they received (v0) on their validation data
            n, acc0, _ = scores[d]
            fleet.device(d).update(rnd, zero_delta(SHAPES, 0.01), metrics={"val_n": n, "val_acc_global": acc0})
        first = fleet.results[-1]
        assert first.round == rnd.round and first.model_version == "v1"
        assert first.detail is not None and first.detail.startswith("v1 kept as a candidate until"), first.detail
        assert fleet.hub.registry.current().version == "v0"  # type: ignore[union-attr]
        assert fleet.retained(TOPICS.announce) is None, "the chain waits for the evaluation round"
        ann = fleet.retained(TOPICS.select_announce)
        assert isinstance(ann, RoundAnnounce) and ann.round == rnd.round + 1
        assert (ann.candidates, ann.local_epochs, ann.selected) == (("v1", "v0"), 0, rnd.selected)
        for version in ("v1", "v0"):
            head = fleet.retained(TOPICS.candidate(version))
            assert isinstance(head, ModelHead) and head.version == version
        for d in rnd.selected:
            n, acc0, acc1 = scores[d]
            _report(fleet, d, ann.round, {"val_n": n, "val_acc_v1": acc1, "val_loss_v1": 1.0, "val_acc_v0": acc0,
                                          "val_loss_v0": 1.0})
        gate = fleet.results[-1]
        assert gate.round == ann.round and gate.status is RoundStatus.COMPLETED, gate
        assert (gate.model_version == "v1") is deployed, gate
        assert fleet.hub.registry.current().version == ("v1" if deployed else "v0")  # type: ignore[union-attr]
        assert (fleet.heads[-1].version == "v1") is deployed
        assert fleet.retained(TOPICS.candidate("v1")) is None and fleet.retained(TOPICS.select_announce) is None
        assert fleet.retained(TOPICS.candidate("v0")) is None
        # the chain goes on from whatever is deployed now
        nxt = fleet.announce()
        assert nxt.round == ann.round + 1 and nxt.model_version == ("v1" if deployed else "v0")
    finally:
        fleet.hub.stop()


def test_a_selection_round_can_be_cancelled(tmp_path: Path, artifacts: Path) -> None:
    from fedge.protocol.control import CancelRequest, encode_cancel

    fleet = Fleet(hub_config(tmp_path / "state", artifacts))
    fleet.hub.start()
    try:
        _register(fleet, tmp_path)
        for d in ("a", "b"):
            fleet.device(d).hello()
        replies = _select(fleet, {"min_devices": 2, "deadline_s": 3000})
        rid = int(replies[0]["round"])  # type: ignore[call-overload]
        _report(fleet, "a", rid, {"val_n": 10.0, "val_acc_good": 0.8, "val_acc_poor": 0.2})
        InMemoryTransport(fleet.broker).publish(TOPICS.control_round_cancel,
                                                encode_cancel(CancelRequest("wrong candidates", request_id="s1")))
        res = fleet.results[-1]
        assert res.round == rid and res.status is RoundStatus.CANCELLED and res.model_version is None
        assert res.detail and "wrong candidates" in res.detail
        assert replies[-1]["request_id"] == "s1" and replies[-1]["reason"] == "cancelled"
        assert fleet.hub.selector.open is None and TOPICS.select_announce not in fleet.broker.retained
        assert fleet.hub.registry.current().version == "v0"  # type: ignore[union-attr]
    finally:
        fleet.hub.stop()


def test_an_open_selection_round_is_published_again_after_a_reconnect(tmp_path: Path, artifacts: Path) -> None:
    """A broker restarted without persistence lost every retained message: the hub publishes the selection round's
    announce and candidates again on reconnect, as it does a plain round's."""
    fleet = Fleet(hub_config(tmp_path / "state", artifacts))
    fleet.hub.start()
    try:
        _register(fleet, tmp_path)
        for d in ("a", "b"):
            fleet.device(d).hello()
        _select(fleet, {"min_devices": 2, "deadline_s": 3000})
        kept = {t for t in fleet.broker.retained if "/model/candidate/" in t or t == TOPICS.select_announce}
        assert len(kept) == 3
        for topic in kept:  # the broker forgot them
            del fleet.broker.retained[topic]
        fleet.hub.on_connect()
        fleet.hub.on_connect()  # the second connect is a reconnect
        fleet.advance(0)
        assert kept <= set(fleet.broker.retained)
    finally:
        fleet.hub.stop()


def test_a_resumed_selection_round_is_published_by_the_restarted_hub(tmp_path: Path, artifacts: Path) -> None:
    """A hub restarted with a fresh broker (the embedded one keeps nothing) publishes the open selection round."""
    cfg = hub_config(tmp_path / "state", artifacts)
    fleet = Fleet(cfg)
    fleet.hub.start()
    _register(fleet, tmp_path)
    for d in ("a", "b"):
        fleet.device(d).hello()
    _select(fleet, {"min_devices": 2, "deadline_s": 3000})
    fleet.hub.stop()
    again = Fleet(cfg)  # a new in-memory broker: nothing retained
    again.hub.start()
    try:
        again.advance(0)
        assert TOPICS.select_announce in again.broker.retained
        assert sum("/model/candidate/" in t for t in again.broker.retained) == 2
    finally:
        again.hub.stop()


def test_a_start_during_the_gates_evaluation_round_is_queued_not_refused(tmp_path: Path, artifacts: Path) -> None:
    """Issue 20: an operator's round start while the deploy gate's evaluation round runs is answered ``queued`` (with
    the id it will have) and opens when the evaluation round closes, instead of "selection round N is open"."""
    from tests.hub.fleet import SHAPES, zero_delta

    cfg = hub_config(tmp_path / "state", artifacts, aggregation={"federated_gate": True})
    fleet = Fleet(cfg)
    replies = _replies(fleet)
    fleet.hub.start()
    try:
        for d in ("a", "b"):
            fleet.device(d).hello()
        rnd = fleet.start_round()
        for d in rnd.selected:
            fleet.device(d).update(rnd, zero_delta(SHAPES, 0.01), metrics={"val_n": 10.0, "val_acc_global": 0.6})
        ann = fleet.retained(TOPICS.select_announce)
        assert isinstance(ann, RoundAnnounce) and ann.round == rnd.round + 1
        first = fleet.results[-1]
        assert first.deployed is False and first.gate_round == ann.round  # the result says who decides
        fleet.control(encode_control(RoundOverrides(request_id="op1", local_epochs=3)))
        assert replies[-1]["reason"] == "queued" and replies[-1]["accepted"] and replies[-1]["round"] == ann.round + 1
        fleet.control(encode_control(RoundOverrides(request_id="op2", local_epochs=7)))  # one waits at a time
        assert replies[-1]["reason"] == "round_open" and not replies[-1]["accepted"]
        fleet.control(encode_control(RoundOverrides(request_id="op3", lr=1e9)))  # over the limits: said so
        assert replies[-1]["reason"] == "over_limits"
        assert fleet.retained(TOPICS.announce) is None  # not yet: the evaluation round is open
        for d in rnd.selected:
            _report(fleet, d, ann.round, {"val_n": 10.0, "val_acc_v1": 0.6, "val_loss_v1": 1.0, "val_acc_v0": 0.6,
                                          "val_loss_v0": 1.0})
        assert fleet.results[-1].round == ann.round and fleet.results[-1].model_version == "v1"
        nxt = fleet.announce()  # the queued start opened at once, over the version the devices validated
        assert nxt.round == ann.round + 1 and nxt.model_version == "v1" and nxt.local_epochs == 3
    finally:
        fleet.hub.stop()


def test_versions_the_devices_keep_rejecting_raise_the_stall_alert(tmp_path: Path, artifacts: Path) -> None:
    """The stall alert counts the federated gate's decisions (review finding: it was reset when the round closed,
    before the devices had decided)."""
    from tests.hub.fleet import SHAPES, zero_delta

    cfg = hub_config(tmp_path / "state", artifacts, aggregation={"federated_gate": True, "deploy_tolerance": 0.0},
                     schedule={"chain_rounds": 3})
    fleet = Fleet(cfg)
    fleet.hub.start()
    try:
        for d in ("a", "b"):
            fleet.device(d).hello()
        rnd = fleet.start_round()
        for n in range(3):
            for d in rnd.selected:
                fleet.device(d).update(rnd, zero_delta(SHAPES, 0.01), metrics={"val_n": 10.0, "val_acc_global": 0.6})
            ann = fleet.retained(TOPICS.select_announce)
            assert isinstance(ann, RoundAnnounce)
            new, deployed = ann.candidates
            assert fleet.hub.store.get_meta("alert") in (None, "")
            for d in rnd.selected:  # every new version scores worse than the deployed one: kept back
                _report(fleet, d, ann.round, {"val_n": 10.0, f"val_acc_{new}": 0.2, f"val_loss_{new}": 2.0,
                                              f"val_acc_{deployed}": 0.6, f"val_loss_{deployed}": 1.0})
            if n < 2:
                rnd = fleet.announce()
        alert = fleet.hub.store.get_meta("alert")
        assert alert and "3 rounds in a row" in alert and "validation" in alert
    finally:
        fleet.hub.stop()


def test_a_queued_start_can_be_cancelled_and_a_failed_one_gets_its_result(tmp_path: Path, artifacts: Path) -> None:
    from fedge.protocol.control import CancelRequest, encode_cancel
    from tests.hub.fleet import SHAPES, zero_delta

    def gate_round(fleet: Fleet) -> RoundAnnounce:
        rnd = fleet.start_round()
        for d in rnd.selected:
            fleet.device(d).update(rnd, zero_delta(SHAPES, 0.01), metrics={"val_n": 10.0, "val_acc_global": 0.6})
        ann = fleet.retained(TOPICS.select_announce)
        assert isinstance(ann, RoundAnnounce)
        return ann

    cfg = hub_config(tmp_path / "state", artifacts, aggregation={"federated_gate": True})
    fleet = Fleet(cfg)
    replies = _replies(fleet)
    fleet.hub.start()
    try:
        for d in ("a", "b"):
            fleet.device(d).hello()
        ann = gate_round(fleet)
        fleet.control(encode_control(RoundOverrides(request_id="op1")))
        InMemoryTransport(fleet.broker).publish(TOPICS.control_round_cancel,
                                                encode_cancel(CancelRequest("no", ann.round + 1, "c1")))
        assert replies[-1]["reason"] == "cancelled" and replies[-1]["round"] == ann.round + 1
        for d in ann.selected:
            _report(fleet, d, ann.round, {"val_n": 10.0, "val_acc_v1": 0.6, "val_loss_v1": 1.0, "val_acc_v0": 0.6,
                                          "val_loss_v0": 1.0})
        assert fleet.retained(TOPICS.announce) is None  # the cancelled start did not open
        ann = gate_round(fleet)  # again; this time the devices are gone when its turn comes
        fleet.control(encode_control(RoundOverrides(request_id="op2")))
        promised = replies[-1]["round"]
        for d in ("a", "b"):
            fleet.device(d).hello(online=False)
        for d in ann.selected:
            _report(fleet, d, ann.round, {"val_n": 10.0, "val_acc_v2": 0.6, "val_loss_v2": 1.0, "val_acc_v1": 0.6,
                                          "val_loss_v1": 1.0})
        last = fleet.results[-1]
        assert last.round == promised and last.status is RoundStatus.FAILED_QUORUM and "queued" in (last.detail or "")
    finally:
        fleet.hub.stop()
def test_one_lying_device_cannot_make_the_federated_gate_deploy_a_worse_version(tmp_path: Path,
                                                                                 artifacts: Path) -> None:
    """Issue 21: one device reports val_n 10^9 with 0.0 for the deployed head in the round and 1.0 for the candidate
    in the evaluation round. Four honest devices score the candidate 10 points below the deployed head (tolerance
    5): it is not deployed, and the liar's numbers are not what the round's result says."""
    from tests.hub.fleet import SHAPES, zero_delta

    cfg = hub_config(tmp_path / "state", artifacts, aggregation={"federated_gate": True, "deploy_tolerance": 0.05},
                     devices=["a", "b", "c", "d", "liar"])
    for fleet in run_hub(cfg):
        rnd = fleet.start_round()
        for d in rnd.selected:
            honest = {"val_n": 10.0, "val_acc_global": 0.6}
            lie = {"val_n": 1e9, "val_acc_global": 0.0}
            fleet.device(d).update(rnd, zero_delta(SHAPES, 0.01), metrics=lie if d == "liar" else honest)
        first = fleet.results[-1]
        assert first.federated["val_acc_global"] == pytest.approx(0.6) and first.federated["val_n"] < 100
        ann = fleet.retained(TOPICS.select_announce)
        assert isinstance(ann, RoundAnnounce) and ann.candidates == ("v1", "v0")
        for d in ann.selected:  # the liar repeats its score of the deployed head (its history check passes)
            report = ({"val_n": 1e9, "val_acc_v1": 1.0, "val_loss_v1": 0.0, "val_acc_v0": 0.0, "val_loss_v0": 9.0}
                      if d == "liar" else
                      {"val_n": 10.0, "val_acc_v1": 0.5, "val_loss_v1": 1.2, "val_acc_v0": 0.6, "val_loss_v0": 1.0})
            _report(fleet, d, ann.round, report)
        gate = fleet.results[-1]
        assert gate.round == ann.round and gate.model_version is None, gate.detail
        assert fleet.hub.registry.current().version == "v0"  # type: ignore[union-attr]
        assert gate.federated["val_acc_v1"] == pytest.approx(0.5)


def test_an_evaluation_report_that_contradicts_the_devices_round_update_is_refused(tmp_path: Path,
                                                                                   artifacts: Path) -> None:
    """A device scored the deployed head at the start of the round that made the candidate (``val_acc_global``); in
    the evaluation round it scores the same head on the same rows again. A report that gives it another score, or
    claims more validation rows than the round's update did, is refused (``malformed``, naming the round) and not
    counted; consistent reports are (the liar of ``bench/attacks.py``'s ``lying_gate``: 0.0 in the round, 1.0 in the
    evaluation round)."""
    from tests.hub.fleet import SHAPES, zero_delta

    cfg = hub_config(tmp_path / "state", artifacts, aggregation={"federated_gate": True, "deploy_tolerance": 0.05},
                     devices=["a", "b", "c", "grow", "liar"])
    for fleet in run_hub(cfg):
        rnd = fleet.start_round()
        for d in rnd.selected:
            metrics = {"val_n": 10.0, "val_acc_global": 0.0 if d == "liar" else 0.6}
            fleet.device(d).update(rnd, zero_delta(SHAPES, 0.01), metrics=metrics)
        ann = fleet.retained(TOPICS.select_announce)
        assert isinstance(ann, RoundAnnounce) and ann.candidates == ("v1", "v0")
        for d in ann.selected:
            report = {"val_n": 10.0, "val_acc_v1": 0.6, "val_loss_v1": 1.0, "val_acc_v0": 0.6, "val_loss_v0": 1.0}
            if d == "liar":
                report.update({"val_acc_v1": 1.0, "val_acc_v0": 1.0})
            elif d == "grow":
                report["val_n"] = 1e9
            _report(fleet, d, ann.round, report)
        refused = {d: [m for m in fleet.device(d).inbox if isinstance(m, Reject)] for d in ann.selected}
        for d in ("liar", "grow"):
            assert [str(m.reason) for m in refused[d]] == ["malformed"], (d, refused[d])
            assert f"contradicts its update in round {rnd.round}" in (refused[d][0].detail or "")
        assert "scored the same head 0 before" in (refused["liar"][0].detail or "")
        assert all(not refused[d] for d in ("a", "b", "c"))
        gate = fleet.results[-1]  # the round does not wait for devices caught contradicting themselves
        assert gate.round == ann.round and sorted(gate.devices) == ["a", "b", "c"], gate
        assert fleet.hub.store.reject_counts(ann.round).get("malformed") == 2


def test_paired_gain_is_what_one_liar_cannot_move() -> None:
    """Label-skewed devices score heads very differently; one liar scoring the deployed head 0 and the candidate 1
    moves two unpaired trimmed means apart by their spread, and the paired gain not at all."""
    from fedge.core.aggregators import robust_mean
    from fedge.core.selection import paired_gain

    base = {f"d{i}": {"val_n": 50.0, "val_acc_global": x} for i, x in enumerate((0.3, 0.45, 0.6, 0.75))}
    cand = {f"d{i}": {"val_n": 50.0, "val_acc_v2": x - 0.1} for i, x in enumerate((0.3, 0.45, 0.6, 0.75))}
    base["liar"], cand["liar"] = {"val_n": 1e9, "val_acc_global": 0.0}, {"val_n": 1e9, "val_acc_v2": 1.0}
    w = [50.0] * 5
    unpaired = (robust_mean([c["val_acc_v2"] for c in cand.values()], w)
                - robust_mean([b["val_acc_global"] for b in base.values()], w))
    assert unpaired > 0.0  # the candidate, 10 points worse on every honest device, looks better
    gain = paired_gain(cand, base, "val_acc_v2", "val_acc_global")
    assert gain is not None and gain[0] == pytest.approx(-0.1) and gain[1] == 5
    assert paired_gain({"x": {"val_n": 1.0, "val_acc_v2": 0.5}}, base, "val_acc_v2", "val_acc_global") is None


def test_the_federated_gate_compares_heads_per_device() -> None:
    """The gate's decision is the robust mean of each device's candidate-minus-deployed difference: a liar scoring
    the candidate 1 and the deployed head 0 is one extreme difference, dropped, where two separately trimmed means
    drift apart by the honest devices' spread (and deployed a candidate 10 points worse against tolerance 5)."""
    from fedge.core.aggregators import robust_mean
    from fedge.core.selection import gate_verdict

    honest = (0.3, 0.45, 0.6, 0.75, 0.5)
    reports = [{"val_n": 50.0, "val_acc_v2": x - 0.1, "val_acc_v1": x} for x in honest]
    liar = {"val_n": 1e9, "val_acc_v2": 1.0, "val_acc_v1": 0.0}
    unpaired = (robust_mean([r["val_acc_v2"] for r in [*reports, liar]], [50.0] * 6)
                - robust_mean([r["val_acc_v1"] for r in [*reports, liar]], [50.0] * 6))
    assert unpaired > -0.05  # what comparing the two heads' trimmed means would have deployed
    verdict = gate_verdict("v2", "v1", [*reports, liar], 3, 0.05)
    assert verdict.quorum and not verdict.deploy, verdict.detail
    assert "paired difference -0.1000" in verdict.detail
    better = [{"val_n": 50.0, "val_acc_v2": x + 0.02, "val_acc_v1": x} for x in honest]
    assert gate_verdict("v2", "v1", [*better, liar], 3, 0.05).deploy
    # a real loss on one device of five: its difference is the extreme one the paired mean trims away; the
    # federated accuracies of the two heads still show it
    pairs = [(0.2, 0.2), (0.5, 0.5), (0.6, 0.6), (0.7, 0.45), (0.95, 0.95)]  # (deployed, candidate)
    skewed = [{"val_n": 50.0, "val_acc_v1": a, "val_acc_v2": b} for a, b in pairs]
    lost = gate_verdict("v2", "v1", skewed, 3, 0.05)
    assert not lost.deploy and "paired difference +0.0000" in lost.detail, lost.detail
    only_candidate = [{"val_n": 50.0, "val_acc_v2": 0.9} for _ in honest]  # nobody scored the deployed head
    assert not gate_verdict("v2", "v1", only_candidate, 3, 0.05).quorum
