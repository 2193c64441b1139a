"""The device's SecAgg session on the wire (src/fedge/core/secagg_session.py) and the hub's first checks: redelivered
frames are ignored, a hub frame that breaks the protocol aborts, low-order keys are refused at advertise,
distributed-DP announces the device cannot honour are refused, and hostile counts do not make decoding work."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from fedge.core.privacy import DpParams
from fedge.core.secagg import RoundSetup, SecAggConfig, usable_public_key
from fedge.core.secagg_server import SecAggServer
from fedge.core.secagg_session import DeviceSession, auto_clip, distributed_problem, stage_frame
from fedge.protocol.codec import decode as decode_frame
from fedge.protocol.errors import SecAggError, SecAggFailure
from fedge.protocol.messages import RoundAnnounce, SecAggStage
from fedge.protocol.secagg_wire import AdvertiseKeys, KeysBroadcast, PeerKeys, decode

COHORT = ("a", "b", "c", "d")


def announce(**over: object) -> RoundAnnounce:
    fields: dict[str, object] = dict(fleet="f", round=3, model_version="v1", backbone_sha256="ab" * 32, deadline=1e12,
                                     min_devices=2, selected=COHORT, local_epochs=1, lr=0.1, secagg_seed="5e" * 32,
                                     secagg_degree=3, secagg_threshold=2, secagg_ring_bits=32, secagg_clip=1.0,
                                     secagg_scale=65536.0)
    fields.update(over)
    return RoundAnnounce(**fields)  # type: ignore[arg-type]


def frame_of(session: DeviceSession, msg: object) -> SecAggStage:
    out = decode_frame(stage_frame("f", 3, session.device, msg))  # type: ignore[arg-type]
    assert isinstance(out, SecAggStage)
    return out


def broadcast(sessions: dict[str, DeviceSession], to: str) -> KeysBroadcast:
    adverts = {}
    for name, s in sessions.items():
        f = decode_frame(s.start()[0])
        assert isinstance(f, SecAggStage)
        adv = decode(f.stage["fsa"].tobytes())
        assert isinstance(adv, AdvertiseKeys)
        adverts[name] = adv
    me = sessions[to]
    peers = tuple(PeerKeys(p, adverts[p].enc_pk, adverts[p].mask_pk) for p in me.setup.neighbours(to))
    return KeysBroadcast(me.setup.round_id, "hub", to, peers)


def test_a_redelivered_hub_frame_is_ignored_not_an_abort() -> None:
    sessions = {d: DeviceSession(announce(), d) for d in COHORT}
    keys = broadcast(sessions, "a")
    first = sessions["a"].on_frame(frame_of(sessions["a"], keys))
    assert len(first) == 1  # its shares
    assert sessions["a"].on_frame(frame_of(sessions["a"], keys)) == []  # QoS-1 redelivery
    assert sessions["a"].failure is None


def test_a_hub_frame_with_a_low_order_key_aborts_the_device() -> None:
    sessions = {d: DeviceSession(announce(), d) for d in COHORT}
    keys = broadcast(sessions, "a")
    bad = KeysBroadcast(keys.round_id, "hub", "a", (PeerKeys(keys.peers[0].peer, bytes(32), bytes(32)),
                                                    *keys.peers[1:]))
    assert sessions["a"].on_frame(frame_of(sessions["a"], bad)) == []
    assert sessions["a"].failure is not None and sessions["a"].failure.reason is SecAggFailure.MALFORMED


def test_the_hub_refuses_low_order_public_keys_at_advertise() -> None:
    setup = RoundSetup("r", COHORT, b"s" * 32, SecAggConfig(degree=3, threshold=2))
    server = SecAggServer(setup, 8)
    assert not usable_public_key(bytes(32)) and not usable_public_key(bytes([1]) + bytes(31))
    with pytest.raises(SecAggError) as err:
        server.receive_advertise(AdvertiseKeys("r", "a", bytes(32), bytes(32), b"c" * 32))
    assert err.value.reason is SecAggFailure.MALFORMED and "low-order" in err.value.detail
    assert server.adverts == {}


@pytest.mark.parametrize(("over", "why"), [
    ({"dp_min_cohort": 10**8}, "not in 2..4"),
    ({"dp_min_cohort": 1}, "not in 2..4"),
    ({"secagg_clip": 1e-3}, "below C + 6 noise"),
    ({"secagg_scale": 1.0}, "quantisation step"),
])
def test_distributed_dp_announces_the_device_cannot_honour_are_refused(over: dict[str, object], why: str) -> None:
    dp = DpParams("distributed", 1.0, 1.0, 1.0, min_cohort=3)
    ok = announce(secagg_clip=auto_clip(dp, 1.0))
    assert distributed_problem(dp, len(ok.selected), ok.secagg_clip, ok.secagg_scale) is None
    m = over.pop("dp_min_cohort", 3)
    bad = DpParams("distributed", 1.0, 1.0, 1.0, min_cohort=m)  # type: ignore[arg-type]
    msg = announce(**{"secagg_clip": auto_clip(dp, 1.0), "dp_min_cohort": m, **over})
    problem = distributed_problem(bad, len(msg.selected), msg.secagg_clip, msg.secagg_scale)
    assert problem is not None and why in problem


def test_hostile_counts_are_refused_before_any_item_is_built() -> None:
    rid = b"r"
    body = b"FSA\x01\x03" + struct.pack(">H", len(rid)) + rid + struct.pack(">H", 1) + b"a"
    payload = body + struct.pack(">I", 1_000_000) + bytes(5_999_990)  # 10 bytes short of a million empty bundles
    with pytest.raises(SecAggError) as err:
        decode(payload)
    assert err.value.reason is SecAggFailure.MALFORMED and "count" in err.value.detail


def test_masked_input_waits_for_both_relay_and_update() -> None:
    s = DeviceSession(announce(), "a")
    assert s.set_input(np.zeros(4, dtype=np.uint64)) == [] and not s.masked_sent
