"""Crash mid-round (no clean shutdown) and restart on the same state_dir: the round resumes intact."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedge.protocol.codec import encode
from fedge.protocol.messages import Ack, ModelHead, RoundAnnounce, RoundStatus
from tests.hub.fleet import SHAPES, TOPICS, Fleet, hub_config, zero_delta


def test_restart_resumes_open_round_without_loss_or_double_count(tmp_path: Path, artifacts: Path) -> None:
    cfg = hub_config(tmp_path / "state", artifacts, rounds={"min_devices": 2},  # plain FedAvg arithmetic below
                     aggregation={"norm_multiplier": 4.0, "max_weight_share": 1.0})
    first = Fleet(cfg)
    first.hub.start()
    for name in "abc":
        first.device(name).hello()
    rnd = first.start_round()
    ua = first.device("a").update(rnd, zero_delta(SHAPES, 1.0), n=10)
    first.device("b").update(rnd, zero_delta(SHAPES, 4.0), n=30)
    first.hub.halt()  # as kill -9: no offline status, nothing closed

    second = Fleet(cfg, broker=first.broker)  # the broker (and its retained state) survives
    second.clock.t = first.clock.t + 5
    second.hub.start()
    resumed = second.hub.round
    assert resumed is not None and resumed.id == rnd.round
    assert resumed.accepted == {"a": ua.nonce, "b": second.hub.store.accepted_nonces(rnd.round)["b"]}
    assert resumed.aggregator.count == 2 and resumed.n_samples == 40
    again = second.retained(TOPICS.announce)
    assert isinstance(again, RoundAnnounce) and again.round == rnd.round and again.deadline == rnd.deadline
    # the broker redelivers a's unacked update: re-acked, not counted twice
    a = second.device("a")
    a.send(encode(ua))
    assert isinstance(a.inbox[-1], Ack) and a.inbox[-1].ref_nonce == ua.nonce
    assert resumed.aggregator.count == 2
    second.advance(30)  # past the original deadline
    [res] = [r for r in second.results if r.round == rnd.round]
    assert res.status is RoundStatus.COMPLETED and res.n_samples == 40 and res.devices == ("a", "b")
    head = second.retained(TOPICS.model_head)
    v0 = second.hub.registry.load_head("v0")
    assert isinstance(head, ModelHead) and head.version == "v1"
    got = np.asarray(head.head["h0_bias"], np.float64)
    np.testing.assert_allclose(got, v0["h0_bias"] + (10 * 1 + 30 * 4) / 40, rtol=1e-6)
    second.hub.stop()


def test_restart_after_deadline_closes_at_once(tmp_path: Path, artifacts: Path) -> None:
    cfg = hub_config(tmp_path / "state", artifacts, rounds={"min_devices": 1})
    first = Fleet(cfg)
    first.hub.start()
    first.device("a").hello()
    first.device("b").hello()
    rnd = first.start_round(deadline_s=10.0)
    first.device("a").update(rnd, zero_delta(SHAPES, 1.0))
    first.hub.halt()
    second = Fleet(cfg, broker=first.broker)
    second.clock.t = first.clock.t + 60
    second.hub.start()
    second.hub.tick()
    assert second.hub.round is None
    assert second.hub.store.round(rnd.round).status == "completed"  # type: ignore[union-attr]
    assert TOPICS.announce not in second.broker.retained
    second.hub.stop()


def test_a_resumed_round_keeps_the_privacy_it_was_announced_with(tmp_path: Path, artifacts: Path) -> None:
    """The hub's configuration changed while it was down: an open round resumes with the DP (or none) it was
    announced and charged with, never with today's settings (review finding: a DP round must not close without its
    noise, and a plain round must not stop the hub from starting)."""
    from dataclasses import replace

    from fedge.core.aggregators import Aggregator, DpAggregator

    private = {"mode": "central", "noise_multiplier": 1.0, "clip": 1.0, "sample_rate": 1.0}
    cfg_dp = hub_config(tmp_path / "dp", artifacts, rounds={"min_devices": 1}, privacy=private)
    first = Fleet(cfg_dp)
    first.hub.start()
    first.device("a").hello()
    first.device("z").hello()  # selected too, never answers: the round stays open
    rnd = first.start_round()
    assert set(rnd.selected) == {"a", "z"}
    first.device("a").update(rnd, zero_delta(SHAPES, 0.1), n=1, metrics={})
    first.hub.halt()
    plain = replace(cfg_dp, privacy=hub_config(tmp_path / "x", artifacts).privacy)  # privacy turned off
    second = Fleet(plain, broker=first.broker)
    second.hub.start()
    resumed = second.hub.round
    assert resumed is not None and isinstance(resumed.aggregator, DpAggregator)
    second.advance(60)
    assert second.hub.store.recent_update_norms(5) == []  # a DP round's norms never join the history
    second.hub.stop()

    cfg_plain = hub_config(tmp_path / "plain", artifacts, rounds={"min_devices": 1})
    third = Fleet(cfg_plain)
    third.hub.start()
    third.device("b").hello()
    third.device("z").hello()
    rnd = third.start_round()
    third.device("b").update(rnd, zero_delta(SHAPES, 0.1), n=5)
    third.hub.halt()
    turned_on = hub_config(tmp_path / "plain", artifacts, rounds={"min_devices": 1}, privacy=private)
    fourth = Fleet(turned_on, broker=third.broker)
    fourth.hub.start()  # the plain round resumes as a plain round
    resumed = fourth.hub.round
    assert resumed is not None and type(resumed.aggregator) is Aggregator and resumed.aggregator.count == 1
    fourth.advance(60)
    assert fourth.hub.store.round(rnd.round).status == "completed"  # type: ignore[union-attr]
    fourth.hub.stop()
