"""A device that breaks SecAgg rounds is dropped from them, named and then excluded (issue 21, item 4), on the hub
with the agents' own session code."""

from __future__ import annotations

import os
import secrets
from dataclasses import replace
from pathlib import Path

import numpy as np

from fedge.core.secagg import SHAMIR_PRIME, SHARE_BYTES
from fedge.core.secagg_session import stage_frame, stage_of
from fedge.protocol.codec import decode
from fedge.protocol.messages import RoundStatus
from fedge.protocol.secagg_wire import RevealedShare, Sealed, ShareKeys, UnmaskResponse
from tests.hub.fleet import FLEET, SHAPES, Fleet, hub_config, run_hub
from tests.hub.test_secagg_hub import SaDevice, settle

NAMES = ("d0", "d1", "d2", "d3", "d4")


class Hostile(SaDevice):
    """Seals garbage share bundles (``shares``) or reveals garbage shares (``unmask``)."""

    def __init__(self, fleet: Fleet, name: str, how: str) -> None:
        self.how = how
        super().__init__(fleet, name)

    def send(self, frames: list[bytes]) -> None:
        out = []
        for f in frames:
            msg = stage_of(decode(f))  # type: ignore[arg-type]
            if self.how == "shares" and isinstance(msg, ShareKeys):
                msg = replace(msg, shares=tuple(Sealed(s.peer, os.urandom(len(s.ciphertext))) for s in msg.shares))
            elif self.how == "unmask" and isinstance(msg, UnmaskResponse):
                def junk(s: RevealedShare) -> RevealedShare:
                    return RevealedShare(s.peer, s.index, secrets.randbelow(SHAMIR_PRIME).to_bytes(SHARE_BYTES, "big"))

                msg = replace(msg, seed_shares=tuple(junk(s) for s in msg.seed_shares),
                              key_shares=tuple(junk(s) for s in msg.key_shares))
            out.append(stage_frame(FLEET, decode(f).round, self.name, msg))  # type: ignore[attr-defined]
        super().send(out)


def _round(fleet: Fleet, how: str) -> tuple[object, object]:
    devs = {d: (Hostile(fleet, d, how) if d == "d4" else SaDevice(fleet, d)) for d in NAMES}
    for d in devs.values():
        d.hello()
    ann = fleet.start_round()
    for d in ann.selected:
        devs[d].join(ann)
    settle(fleet)
    for d in ann.selected:
        devs[d].input({k: np.full(s, 0.01, np.float32) for k, s in SHAPES.items()})
    settle(fleet)
    return ann, fleet.results[-1]


def test_garbage_bundles_drop_their_sender_and_a_repeat_excludes_it(tmp_path: Path, artifacts: Path) -> None:
    cfg = hub_config(tmp_path / "state", artifacts, rounds={"min_devices": 3, "over_select": 0.0},
                     secagg={"enabled": True, "stage_timeout_s": 5.0}, conduct={"strikes": 2})
    for fleet in run_hub(cfg):
        for _ in range(2):
            ann, res = _round(fleet, "shares")
            assert res.status is RoundStatus.COMPLETED and "d4" not in res.devices  # type: ignore[attr-defined]
            included, dropped, *_ = fleet.hub.store.secagg_sum(ann.round)  # type: ignore[attr-defined, misc]
            assert included == list(NAMES[:4]) and dropped == ["d4"]
        alerts = fleet.hub.store.alerts()
        assert [a["kind"] for a in alerts] == ["excluded", "bad_shares", "bad_shares"]
        assert all(a["device"] == "d4" for a in alerts)
        ann, _ = _round(fleet, "shares")
        assert "d4" not in ann.selected  # type: ignore[attr-defined]


def test_garbage_revealed_shares_are_outvoted_and_blamed(tmp_path: Path, artifacts: Path) -> None:
    cfg = hub_config(tmp_path / "state", artifacts, rounds={"min_devices": 3, "over_select": 0.0},
                     secagg={"enabled": True, "stage_timeout_s": 5.0})
    for fleet in run_hub(cfg):
        _ann, res = _round(fleet, "unmask")
        assert res.status is RoundStatus.COMPLETED  # type: ignore[attr-defined]
        assert sorted(res.devices) == list(NAMES)  # type: ignore[attr-defined]  # its own input is fine
        [alert] = fleet.hub.store.alerts()
        assert alert["kind"] == "bad_unmask" and alert["device"] == "d4"
        assert fleet.hub.store.standing("d4").strikes == 1
