"""Buffered asynchronous rounds on the wire (issue 22 item 3): a version every buffer_k accepted updates, updates
trained on an older version of the round weighted 1/sqrt(1 + staleness), too stale ones rejected, one update per
device and model version, the round re-announced on each new version."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.core.aggregators import Bounds
from fedge.core.buffered import Buffer, BufferChain, BufferSettings, staleness_weight
from fedge.core.losses import Score
from fedge.hub.config import HubConfig
from fedge.hub.daemon import gate_warnings
from fedge.hub.dashboard.snapshot import FleetReader
from fedge.protocol.codec import encode
from fedge.protocol.control import CancelRequest, encode_cancel
from fedge.protocol.errors import ConfigError
from fedge.protocol.messages import Ack, ModelUpdate, Reject, RejectReason, RoundAnnounce, RoundStatus
from fedge.protocol.transport import InMemoryTransport
from tests.hub.fleet import SHAPES, TOPICS, Device, Fleet, hub_config, run_hub, zero_delta

# plain FedAvg arithmetic: no pull toward w0, no clipping of these similar norms, no weight cap
LOOSE = {"proximal_lambda": 0.0, "norm_multiplier": 4.0, "max_weight_share": 1.0}


def buffered(tmp_path: Path, artifacts: Path, **rounds: Any) -> HubConfig:
    table = {"mode": "buffered", "buffer_k": 2, "max_staleness": 1, "over_select": 0, "min_devices": 1,
             "deadline_s": 60, **rounds}
    return hub_config(tmp_path / "state", artifacts, devices=["a", "b", "c", "d"], rounds=table, aggregation=LOOSE)


def head(fleet: Fleet, version: str) -> dict[str, np.ndarray]:
    return fleet.hub.registry.load_head(version)


def current(fleet: Fleet) -> str | None:
    row = fleet.hub.registry.current()
    return None if row is None else row.version


def last(inbox: list[Any]) -> Any:
    return inbox[-1]


def test_a_version_every_k_updates_staleness_weighted_and_too_stale_updates_rejected(tmp_path: Path,
                                                                                    artifacts: Path) -> None:
    cfg = buffered(tmp_path, artifacts)
    for fleet in run_hub(cfg):
        a, b, c, d = (fleet.device(n) for n in "abcd")
        ann0 = fleet.start_round()
        assert ann0.buffer_k == 2 and ann0.max_staleness == 1 and ann0.model_version == "v0"
        v0 = head(fleet, "v0")

        # two fresh updates on v0: version v1 = v0 + their mean, deployed, the round re-announced on it
        a.update(ann0, zero_delta(SHAPES, 1.0))
        assert a.kinds() == ["ack"] and current(fleet) == "v0"
        b.update(ann0, zero_delta(SHAPES, 3.0))
        assert b.kinds() == ["ack"]  # once, also when its update makes the version
        ann1 = fleet.announce()
        assert (ann1.round, ann1.model_version, ann1.buffer_k) == (ann0.round, "v1", 2)
        assert current(fleet) == "v1" and fleet.heads[-1].version == "v1"
        row1 = fleet.hub.store.version("v1")
        assert row1 is not None and row1.round == ann0.round and row1.parent == "v0"
        for k in SHAPES:
            np.testing.assert_allclose(head(fleet, "v1")[k], v0[k] + 2.0, atol=1e-5)

        # c trained on v0 (one version behind: allowed, weight 1/sqrt(2)); a sends again, now on v1
        uc = c.update(ann0, zero_delta(SHAPES, 2.0))
        assert isinstance(last(c.inbox), Ack)
        c.send(encode(uc))  # a redelivery: acked again, not counted
        assert isinstance(last(c.inbox), Ack) and fleet.announce().model_version == "v1"
        a.update(ann1, zero_delta(SHAPES, 0.5))
        ann2 = fleet.announce()
        assert ann2.model_version == "v2"
        w = staleness_weight(1)
        assert w == pytest.approx(1 / math.sqrt(2))
        expected = (2.0 * w + 0.5) / 2  # equal sample counts: the mean of the weighted deltas
        for k in SHAPES:
            np.testing.assert_allclose(head(fleet, "v2")[k] - head(fleet, "v1")[k], expected, atol=1e-5)
        # the same arithmetic as the core's Buffer (what the simulator runs)
        buf = Buffer(SHAPES, BufferSettings(2, 1), 0.0, Bounds(norm_multiplier=4.0, max_weight_share=1.0))
        buf.add(zero_delta(SHAPES, 2.0), 10, 1)
        buf.add(zero_delta(SHAPES, 0.5), 10, 0)
        ref = buf.result(head(fleet, "v1"), v0)
        for k in SHAPES:
            np.testing.assert_allclose(head(fleet, "v2")[k], ref[k], atol=1e-5)

        # d still on v0: two versions behind, beyond max_staleness 1
        d.update(ann0, zero_delta(SHAPES, 1.0))
        rej = last(d.inbox)
        assert isinstance(rej, Reject) and rej.reason is RejectReason.STALE_ROUND
        assert "2 versions behind" in rej.detail and "at most 1" in rej.detail
        # a second update of a on v1 (another nonce): one per device and version
        a.update(ann1, zero_delta(SHAPES, 0.5))
        assert isinstance(last(a.inbox), Reject) and last(a.inbox).reason is RejectReason.DUPLICATE
        # a version the round never announced
        a.update(ann2, zero_delta(SHAPES, 0.5), model_version="v9")
        assert isinstance(last(a.inbox), Reject) and last(a.inbox).reason is RejectReason.WRONG_MODEL
        # a on v2: its third update of the round, in the buffer of the next version when the deadline comes
        a.update(ann2, zero_delta(SHAPES, 0.5))
        assert isinstance(last(a.inbox), Ack)

        reader = FleetReader(cfg.state_dir / "hub.sqlite", fleet=cfg.fleet)
        [open_row] = reader.snapshot()["rounds"]
        assert open_row["status"] == "open" and open_row["devices"] == 3  # a, b, c (a sent three updates)
        facts = reader.metric_facts()
        assert facts is not None and facts.accepted_updates == 5

        fleet.advance(61)
        [res] = fleet.results
        assert res.status is RoundStatus.COMPLETED and res.model_version == "v2" and res.rejected == 3
        snap = reader.snapshot()
        assert snap["current_version"] == "v2" and snap["rounds"][0]["new_version"] == "v2"
        assert set(res.devices) == {"a", "b", "c"} and res.n_samples == 50
        assert "2 versions made (v1, v2)" in (res.detail or "") and "1 updates in the unfilled buffer" in (
            res.detail or "")
        assert fleet.hub.store.reject_counts(ann0.round) == {"stale_round": 1, "duplicate": 1, "wrong_model": 1}
        assert [r.version for r in fleet.hub.store.versions() if r.round == ann0.round] == ["v1", "v2"]
        assert fleet.retained(TOPICS.announce) is None and current(fleet) == "v2"


def test_a_buffered_round_closes_after_max_versions_and_resumes_its_buffer(tmp_path: Path, artifacts: Path) -> None:
    cfg = buffered(tmp_path, artifacts, max_versions=2, buffer_k=2)
    first = Fleet(cfg)
    first.hub.start()
    ann0 = first.start_round()
    first.device("a").update(ann0, zero_delta(SHAPES, 1.0))
    first.device("b").update(ann0, zero_delta(SHAPES, 1.0))
    ann1 = first.announce()
    assert ann1.model_version == "v1"
    first.device("c").update(ann0, zero_delta(SHAPES, 4.0))  # stale by one: in the buffer of v2
    first.hub.halt()  # as kill -9

    second = Fleet(cfg, broker=first.broker)
    second.clock.t = first.clock.t + 1
    second.hub.start()
    rnd = second.hub.round
    assert rnd is not None and rnd.chain is not None and rnd.buffer is not None
    assert rnd.model_version == "v1" and rnd.chain.versions == ["v0", "v1"] and rnd.buffer.count == 1
    again = second.retained(TOPICS.announce)
    assert isinstance(again, RoundAnnounce) and again.model_version == "v1"
    a = second.device("a")
    a.update(ann0, zero_delta(SHAPES, 1.0))  # a already sent on v0
    assert isinstance(last(a.inbox), Reject) and last(a.inbox).reason is RejectReason.DUPLICATE
    a.update(ann1, zero_delta(SHAPES, 1.0))  # v2 made: the round's second version, so it closes
    assert second.hub.round is None
    [res] = second.results
    assert res.status is RoundStatus.COMPLETED and res.model_version == "v2"
    expected = (4.0 * staleness_weight(1) + 1.0) / 2
    v1, v2 = second.hub.registry.load_head("v1"), second.hub.registry.load_head("v2")
    for k in SHAPES:
        np.testing.assert_allclose(v2[k] - v1[k], expected, atol=1e-5)
    second.hub.stop()


def test_a_buffered_round_without_k_updates_makes_no_version(tmp_path: Path, artifacts: Path) -> None:
    cfg = buffered(tmp_path, artifacts, buffer_k=3)
    for fleet in run_hub(cfg):
        ann = fleet.start_round()
        fleet.device("a").update(ann, zero_delta(SHAPES, 1.0))
        fleet.advance(61)
        [res] = fleet.results
        assert res.status is RoundStatus.FAILED_QUORUM and res.model_version is None
        assert current(fleet) == "v0"


def test_a_held_back_version_is_a_candidate_and_devices_stay_on_the_deployed_one(tmp_path: Path,
                                                                                artifacts: Path) -> None:
    scores = iter([0.9, 0.5])  # v0 (at start), then the buffered version: worse, held back

    def evaluator(_d: Any, _s: Any, _h: Any) -> Any:
        return Score(loss=1.0, accuracy=next(scores))

    cfg = buffered(tmp_path, artifacts)
    for fleet in run_hub(cfg, evaluator=evaluator):
        ann = fleet.start_round()
        fleet.device("a").update(ann, zero_delta(SHAPES, 1.0))
        fleet.device("b").update(ann, zero_delta(SHAPES, 1.0))
        assert fleet.announce().model_version == "v0" and current(fleet) == "v0"
        row = fleet.hub.store.version("v1")
        assert row is not None and row.accuracy == 0.5 and row.round == ann.round


@pytest.mark.parametrize("section", [{"secagg": {"enabled": True}},
                                     {"privacy": {"mode": "central", "noise_multiplier": 1.0}}])
def test_buffered_rounds_are_refused_with_secagg_and_with_dp(tmp_path: Path, artifacts: Path,
                                                            section: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as err:
        hub_config(tmp_path / "state", artifacts, rounds={"mode": "buffered"}, **section)
    assert err.value.field == "rounds.mode"
    assert ("SecAgg rounds stay synchronous" if "secagg" in section else "not private") in str(err.value)
    hub_config(tmp_path / "state", artifacts, rounds={"mode": "sync"}, **section)  # synchronous: fine


@pytest.mark.parametrize(("key", "value"), [("mode", "async"), ("buffer_k", 0), ("max_staleness", -1),
                                            ("server_lr", 1.5), ("max_versions", -1)])
def test_bad_buffered_settings_name_their_field(tmp_path: Path, artifacts: Path, key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as err:
        hub_config(tmp_path / "state", artifacts, rounds={key: value})
    assert err.value.field == f"rounds.{key}"


def test_a_sync_round_announces_no_buffer(tmp_path: Path, artifacts: Path) -> None:
    for fleet in run_hub(hub_config(tmp_path / "state", artifacts, devices=["a", "b"])):
        ann = fleet.start_round()
        assert ann.buffer_k is None and ann.max_staleness is None
        assert isinstance(fleet.device("a").update(ann, zero_delta(SHAPES, 1.0)), ModelUpdate)


def test_check_warns_that_buffered_versions_deploy_unscored_without_eval_data(tmp_path: Path, artifacts: Path) -> None:
    warnings = gate_warnings(buffered(tmp_path, artifacts))
    assert any("buffered" in w and "deployed unscored" in w for w in warnings)
    assert not any("buffered" in w for w in gate_warnings(hub_config(tmp_path / "state", artifacts)))


def test_a_device_fills_at_most_one_slot_of_a_buffer(tmp_path: Path, artifacts: Path) -> None:
    """K updates from K distinct devices make a version: a device whose update (on any version) is in the buffer being
    filled is refused a second one as duplicate, so one device cannot make a version (or outweigh a median) alone."""
    cfg = hub_config(tmp_path / "state", artifacts, devices=["a", "b", "c", "d"],
                     rounds={"mode": "buffered", "buffer_k": 2, "max_staleness": 1, "over_select": 0,
                             "min_devices": 2, "deadline_s": 60},
                     aggregation={**LOOSE, "strategy": "median"})
    for fleet in run_hub(cfg):
        a, b, c, d = (fleet.device(n) for n in "abcd")
        ann0 = fleet.start_round()
        a.update(ann0, zero_delta(SHAPES, 1.0))
        b.update(ann0, zero_delta(SHAPES, 1.0))
        ann1 = fleet.announce()
        assert ann1.model_version == "v1"
        c.update(ann0, zero_delta(SHAPES, 50.0))  # stale by one: in the buffer of v2
        assert isinstance(last(c.inbox), Ack)
        c.update(ann1, zero_delta(SHAPES, 50.0))  # c's second update into the same buffer
        rej = last(c.inbox)
        assert isinstance(rej, Reject) and rej.reason is RejectReason.DUPLICATE
        assert "buffer of the next version" in rej.detail and "2 distinct devices" in rej.detail
        assert fleet.announce().model_version == "v1" and current(fleet) == "v1"
        d.update(ann1, zero_delta(SHAPES, 1.0))  # the second device: v2 from c's and d's updates
        assert isinstance(last(d.inbox), Ack) and fleet.announce().model_version == "v2"
        c.update(fleet.announce(), zero_delta(SHAPES, 1.0))  # a new buffer: c's update counts again
        assert isinstance(last(c.inbox), Ack)
        assert fleet.hub.store.reject_counts(ann0.round) == {"duplicate": 1}


def test_an_accepted_update_sent_again_is_acked_however_stale_it_became(tmp_path: Path, artifacts: Path) -> None:
    """A redelivery (same nonce; its ack was lost) is recognised before the staleness check: acked again, not
    rejected stale_round once the round moved more than max_staleness versions on."""
    for fleet in run_hub(buffered(tmp_path, artifacts)):
        a, b, c = (fleet.device(n) for n in "abc")
        ann0 = fleet.start_round()
        uc = c.update(ann0, zero_delta(SHAPES, 1.0))
        assert isinstance(last(c.inbox), Ack)  # say this ack is lost
        a.update(ann0, zero_delta(SHAPES, 1.0))
        ann1 = fleet.announce()
        a.update(ann1, zero_delta(SHAPES, 1.0))
        b.update(ann1, zero_delta(SHAPES, 1.0))
        assert fleet.announce().model_version == "v2"  # v0 is two versions behind now (max_staleness 1)
        c.send(encode(uc))  # the same bytes again, from the agent's outbox
        ack = last(c.inbox)
        assert isinstance(ack, Ack) and ack.ref_nonce == uc.nonce
        assert fleet.hub.store.reject_counts(ann0.round) == {}
        c.update(ann0, zero_delta(SHAPES, 1.0))  # a new update on v0 now is too stale (and a duplicate of v0)
        assert isinstance(last(c.inbox), Reject) and last(c.inbox).reason is RejectReason.STALE_ROUND


def _deployed_v1(fleet: Fleet) -> tuple[Device, RoundAnnounce]:
    """A buffered round (k = 2) whose first version, v1, two devices' updates made and deployed: device a, and the
    round's first announce (on v0)."""
    a, b = (fleet.device(n) for n in "ab")
    ann0 = fleet.start_round()
    a.update(ann0, zero_delta(SHAPES, 1.0))
    b.update(ann0, zero_delta(SHAPES, 1.0))
    assert fleet.announce().model_version == "v1"
    return a, ann0


def test_a_cancelled_buffered_round_names_the_versions_it_deployed(tmp_path: Path, artifacts: Path) -> None:
    """Cancelling (or a failed close ending) a buffered round leaves the versions it deployed deployed: its row and
    result name the last of them, and the detail says they stay."""
    for fleet in run_hub(buffered(tmp_path, artifacts)):
        a, ann0 = _deployed_v1(fleet)
        a.update(fleet.announce(), zero_delta(SHAPES, 1.0))  # in the unfilled buffer: dropped
        InMemoryTransport(fleet.broker).publish(TOPICS.control_round_cancel,
                                                encode_cancel(CancelRequest(round=ann0.round)))
        res = fleet.results[-1]
        assert res.status is RoundStatus.CANCELLED and res.model_version == "v1" and res.deployed is True
        assert "stay deployed" in (res.detail or "") and "(v1)" in (res.detail or "")
        row = fleet.hub.store.round(ann0.round)
        assert row is not None and row.new_version == "v1" and current(fleet) == "v1"
        assert fleet.hub.round is None and fleet.retained(TOPICS.announce) is None


def test_a_failed_close_of_a_buffered_round_names_the_versions_it_deployed(tmp_path: Path, artifacts: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    for fleet in run_hub(buffered(tmp_path, artifacts)):
        _deployed_v1(fleet)

        def broken(*_a: Any) -> None:
            raise RuntimeError("disk full")

        monkeypatch.setattr(fleet.hub.rounds, "_close_buffered", broken)
        fleet.advance(61)
        res = fleet.results[-1]
        assert res.status is RoundStatus.FAILED_QUORUM and res.model_version == "v1"
        assert "closing the round failed: disk full" in (res.detail or "") and "stay deployed" in (res.detail or "")
        assert current(fleet) == "v1"


def test_a_stale_update_clipped_to_the_norm_bound_still_counts_less() -> None:
    """The staleness weight scales an update after it was clipped (a large stale update clipped to the bound must not
    count as much as a fresh one), and the norms recorded (the "auto" bound's history) are the updates' own."""
    bounds = Bounds(norm_multiplier=2.0, max_weight_share=1.0)
    zero = zero_delta(SHAPES, 0.0)
    results, norms = {}, {}
    for s in (0, 1, 3):
        buf = Buffer(SHAPES, BufferSettings(3, 5), 0.0, bounds)
        buf.add(zero_delta(SHAPES, 1.0), 10, 0)
        buf.add(zero_delta(SHAPES, 1.2), 10, 0)
        buf.add(zero_delta(SHAPES, 50.0), 10, s)
        results[s] = float(buf.result(zero, zero)[next(iter(SHAPES))].flat[0])
        norms[s] = buf.norms
        summary = buf.aggregator.summary
        assert summary is not None and summary.clipped == 1
    clipped = 3 * results[0] - 1.0 - 1.2  # the big update's coordinate once clipped (fresh: weight 1)
    assert clipped < 50.0
    for s in (1, 3):
        assert results[s] == pytest.approx((1.0 + 1.2 + clipped * staleness_weight(s)) / 3, rel=1e-5)
    assert norms[0] == norms[1] == norms[3]
    assert norms[0][2] == pytest.approx(50.0 * math.sqrt(sum(math.prod(s) for s in SHAPES.values())), rel=1e-5)


def test_check_warns_that_a_buffered_round_skips_the_federated_gate(tmp_path: Path, artifacts: Path) -> None:
    cfg = hub_config(tmp_path / "state", artifacts, rounds={"mode": "buffered"},
                     aggregation={"federated_gate": True})
    assert any("federated_gate = true has no effect" in w and "buffered" in w for w in gate_warnings(cfg))
    sync = hub_config(tmp_path / "state", artifacts, aggregation={"federated_gate": True})
    assert not any("federated_gate = true has no effect" in w for w in gate_warnings(sync))


# -- a held-back version gives its devices their slot back (buffer_attempt) ------------------------------------------

BIG = 100.0  # an update this large makes a version the evaluator below scores low: the gate holds it back


def by_size(_d: Any, _s: Any, h: Any) -> Score:
    """Held-out scores by the head's values: a version made from BIG updates (clipped to the norm bound, still more
    than 10 per coordinate) scores 0.5, any other 0.9 (v0's head is drawn from a standard normal, the other updates
    add at most 4), so the gate (tolerance 0.01) holds back exactly the BIG versions."""
    return Score(loss=1.0, accuracy=0.5 if max(float(np.abs(v).max()) for v in h.values()) > 10 else 0.9)


def stored_attempts(fleet: Fleet, rid: int) -> list[tuple[str, str, int]]:
    rows = fleet.hub.store._all("SELECT device, model_version, attempt FROM buffered_updates WHERE round = ? "
                                "ORDER BY rowid", (rid,))
    return [(str(d), str(v), int(a)) for d, v, a in rows]


def test_a_held_back_version_gives_exactly_its_devices_one_more_update_on_the_same_version(
        tmp_path: Path, artifacts: Path) -> None:
    for fleet in run_hub(buffered(tmp_path, artifacts), evaluator=by_size):
        a, b, c, d = (fleet.device(n) for n in "abcd")
        ann0 = fleet.start_round()
        assert ann0.buffer_attempt == 0
        v0 = head(fleet, "v0")
        ua = a.update(ann0, zero_delta(SHAPES, BIG))
        ub = b.update(ann0, zero_delta(SHAPES, BIG))
        row = fleet.hub.store.version("v1")
        assert row is not None and row.accuracy == 0.5 and current(fleet) == "v0"  # v1 held back
        # the round re-announced on the same version, same round, deadline and selection, in its next attempt
        ann1 = fleet.announce()
        assert (ann1.round, ann1.model_version, ann1.deadline, ann1.selected, ann1.buffer_attempt) == (
            ann0.round, "v0", ann0.deadline, ann0.selected, 1)
        rnd = fleet.hub.round
        assert rnd is not None and rnd.chain is not None
        assert rnd.chain.sent == {} and rnd.chain.pending == {}  # exactly a's and b's slots released
        assert rnd.chain.spent == {("a", "v0", ua.nonce), ("b", "v0", ub.nonce)}

        uc = c.update(ann1, zero_delta(SHAPES, 2.0))  # c made nothing yet: its first update, in the new buffer
        assert isinstance(last(c.inbox), Ack)
        c.update(ann1, zero_delta(SHAPES, 2.0))  # c's second on v0 in this attempt: its slot is taken
        assert isinstance(last(c.inbox), Reject) and last(c.inbox).reason is RejectReason.DUPLICATE
        a.send(encode(ua))  # the spent update again (its ack was lost): a redelivery, acked, not counted
        assert isinstance(last(a.inbox), Ack) and last(a.inbox).ref_nonce == ua.nonce
        assert rnd.buffer is not None and rnd.buffer.count == 1
        assert fleet.hub.store.buffered_update_count(ann0.round) == 3
        ua2 = a.update(ann1, zero_delta(SHAPES, 4.0))  # a's slot on v0 is back: its new update makes v2 with c's
        assert isinstance(last(a.inbox), Ack) and last(a.inbox).ref_nonce == ua2.nonce
        assert current(fleet) == "v2"
        for k in SHAPES:  # (2 + 4) / 2: the spent BIG updates are not in it
            np.testing.assert_allclose(head(fleet, "v2")[k], v0[k] + 3.0, atol=1e-5)
        ann2 = fleet.announce()
        assert (ann2.model_version, ann2.buffer_attempt) == ("v2", 1)  # the counter is the round's: it stays
        a.update(ann1, zero_delta(SHAPES, 1.0))  # a third update on v0: its slot holds ua2 (v2 deployed)
        assert isinstance(last(a.inbox), Reject) and last(a.inbox).reason is RejectReason.DUPLICATE
        b.send(encode(ub))  # b's spent update again, the round a version further on: still a redelivery
        assert isinstance(last(b.inbox), Ack) and last(b.inbox).ref_nonce == ub.nonce
        c.send(encode(uc))
        assert isinstance(last(c.inbox), Ack)
        assert stored_attempts(fleet, ann0.round) == [("a", "v0", 0), ("b", "v0", 0), ("c", "v0", 1), ("a", "v0", 1)]
        assert fleet.hub.store.reject_counts(ann0.round) == {"duplicate": 2}

        b.update(ann0, zero_delta(SHAPES, 1.0))  # b never used its slot back: on v0 (one behind), then on v2
        d.update(ann2, zero_delta(SHAPES, 1.0))
        assert current(fleet) == "v3" and fleet.announce().buffer_attempt == 1
        fleet.advance(61)
        res = fleet.results[-1]
        assert res.status is RoundStatus.COMPLETED and res.model_version == "v3"
        assert set(res.devices) == {"a", "b", "c", "d"}
        assert "3 versions made (v1, v2, v3), 2 deployed" in (res.detail or "")


def test_a_version_made_from_released_devices_can_be_held_back_again(tmp_path: Path, artifacts: Path) -> None:
    """Each buffer that deploys nothing is one more attempt; a device's slot on a version comes back each time a
    buffer its update is in spends it, and never for a device whose update is in the buffer being filled."""
    for fleet in run_hub(buffered(tmp_path, artifacts, buffer_k=2), evaluator=by_size):
        a, b, c = (fleet.device(n) for n in "abc")
        ann = fleet.start_round()
        a.update(ann, zero_delta(SHAPES, BIG))
        b.update(ann, zero_delta(SHAPES, BIG))
        ann = fleet.announce()
        assert ann.buffer_attempt == 1
        a.update(ann, zero_delta(SHAPES, BIG))
        c.update(ann, zero_delta(SHAPES, BIG))  # v2 from a (again) and c: held back too
        ann = fleet.announce()
        assert (ann.model_version, ann.buffer_attempt) == ("v0", 2) and current(fleet) == "v0"
        b.update(ann, zero_delta(SHAPES, 1.0))  # b's slot was released at attempt 1: in the buffer now
        b.update(ann, zero_delta(SHAPES, 1.0))
        assert isinstance(last(b.inbox), Reject) and last(b.inbox).reason is RejectReason.DUPLICATE
        c.update(ann, zero_delta(SHAPES, 1.0))  # c released at attempt 2
        assert isinstance(last(c.inbox), Ack) and current(fleet) == "v3"
        assert [r.version for r in fleet.hub.store.versions() if r.round == ann.round] == ["v1", "v2", "v3"]
        assert stored_attempts(fleet, ann.round) == [("a", "v0", 0), ("b", "v0", 0), ("a", "v0", 1), ("c", "v0", 1),
                                                     ("b", "v0", 2), ("c", "v0", 2)]


def test_a_restarted_hub_keeps_the_attempt_and_the_spent_updates(tmp_path: Path, artifacts: Path) -> None:
    cfg = buffered(tmp_path, artifacts)
    first = Fleet(cfg, evaluator=by_size)
    first.hub.start()
    ann0 = first.start_round()
    ua = first.device("a").update(ann0, zero_delta(SHAPES, BIG))
    ub = first.device("b").update(ann0, zero_delta(SHAPES, BIG))
    ann1 = first.announce()
    assert ann1.buffer_attempt == 1 and ann1.model_version == "v0"
    ua2 = first.device("a").update(ann1, zero_delta(SHAPES, 2.0))  # in the buffer of attempt 1
    first.hub.halt()  # as kill -9

    second = Fleet(cfg, broker=first.broker, evaluator=by_size)
    second.clock.t = first.clock.t + 1
    second.broker.retained.pop(TOPICS.announce)  # what the restarted hub announces, not what the first left
    second.hub.start()
    rnd = second.hub.round
    assert rnd is not None and rnd.chain is not None and rnd.buffer is not None
    assert rnd.chain.attempt == 1 and rnd.buffer.count == 1  # ua2 folded again; ua and ub spent, not folded
    assert rnd.chain.spent == {("a", "v0", ua.nonce), ("b", "v0", ub.nonce)}
    assert rnd.chain.sent == {("a", "v0"): ua2.nonce} and rnd.chain.pending == {"a": "v0"}
    again = second.announce()
    assert (again.round, again.model_version, again.buffer_attempt) == (ann0.round, "v0", 1)
    a, b = second.device("a"), second.device("b")
    for sent in (ua, ua2):  # redeliveries of the spent update and of the one in the buffer: acked, not counted
        a.send(encode(sent))
        assert isinstance(last(a.inbox), Ack) and last(a.inbox).ref_nonce == sent.nonce
    assert rnd.buffer.count == 1 and second.hub.store.buffered_update_count(ann0.round) == 3
    a.update(again, zero_delta(SHAPES, 2.0))  # a second update of a in this buffer
    assert isinstance(last(a.inbox), Reject) and last(a.inbox).reason is RejectReason.DUPLICATE
    b.update(again, zero_delta(SHAPES, 4.0))  # b's slot came back before the restart: v2 from ua2 and this
    assert isinstance(last(b.inbox), Ack) and current(second) == "v2"
    v0 = second.hub.registry.load_head("v0")
    for k in SHAPES:
        np.testing.assert_allclose(second.hub.registry.load_head("v2")[k], v0[k] + 3.0, atol=1e-5)
    assert second.announce().buffer_attempt == 1
    assert stored_attempts(second, ann0.round) == [("a", "v0", 0), ("b", "v0", 0), ("a", "v0", 1), ("b", "v0", 1)]
    second.hub.stop()


def test_the_chain_meta_round_trips_and_reads_a_hub_from_before_attempts() -> None:
    chain = BufferChain(BufferSettings(2, 1), ["v0"])
    chain.sent = {("a", "v0"): "n1", ("b", "v0"): "n2", ("c", "v0"): "n3"}
    chain.pending = {"a": "v0", "b": "v0"}
    assert chain.spend() == ["a", "b"]
    assert chain.attempt == 1 and chain.sent == {("c", "v0"): "n3"}
    assert chain.redelivery("a", "v0", "n1") and not chain.redelivery("a", "v0", "n9")
    assert chain.duplicate("a", "v0") is None and chain.duplicate("c", "v0") is not None
    saved = json.loads(json.dumps(chain.to_meta()))
    back = BufferChain.from_meta(chain.settings, saved, "v0")
    assert (back.versions, back.attempt, back.spent, back.folded) == (chain.versions, 1, chain.spent, chain.folded)
    old = BufferChain.from_meta(chain.settings, {"versions": ["v0", "v1"], "made": ["v1"], "folded": 2}, "v0")
    assert (old.current, old.attempt, old.spent, old.made) == ("v1", 0, set(), ["v1"])


def test_a_store_from_before_buffer_attempts_is_migrated_in_order(tmp_path: Path) -> None:
    import sqlite3

    from fedge.hub.store import Store

    db = tmp_path / "hub.sqlite"
    with sqlite3.connect(db) as con:  # the table as the first buffered release created it
        con.execute("CREATE TABLE buffered_updates (round INTEGER NOT NULL, device TEXT NOT NULL, model_version TEXT "
                    "NOT NULL, nonce TEXT NOT NULL, n_samples INTEGER NOT NULL, metrics TEXT NOT NULL, payload BLOB "
                    "NOT NULL, received_at REAL NOT NULL, payload_at INTEGER, payload_len INTEGER, "
                    "UNIQUE(round, device, model_version))")
        for device in ("b", "a"):
            con.execute("INSERT INTO buffered_updates VALUES (1, ?, 'v0', ?, 10, '{}', x'01', 0, NULL, NULL)",
                        (device, f"n{device}"))
    store = Store(db, keep_update_payloads=True)
    try:
        assert [s.device for s in store.iter_buffered_updates(1)] == ["b", "a"]
        store.add_buffered_update(1, "a", "v0", "na2", 10, {}, b"\x02", attempt=1)  # a second one, next attempt
        with pytest.raises(sqlite3.IntegrityError):
            store.add_buffered_update(1, "a", "v0", "na3", 10, {}, b"\x03", attempt=1)
        assert [(s.device, s.nonce) for s in store.iter_buffered_updates(1)] == [("b", "nb"), ("a", "na"),
                                                                                  ("a", "na2")]
    finally:
        store.close()
