"""SecAgg+ server side: a transport-free state machine that collects stage messages, decides the survivors,
relays sealed shares it cannot read, and reconstructs only the sum (on the wire: `fedge.core.secagg_round`).

Survivor sets: U1 advertised keys, U2 sent its shares, U3 sent its masked input, U4 answered the unmask
request. The sum covers exactly U3. For each u in U3 its self-mask seed is rebuilt from t seed shares;
for each u in U2 \\ U3 its mask key is rebuilt from t key shares and its pairwise masks with U3 removed.
Each ``receive_*`` raises `SecAggError` with a reason for a message it rejects (wrong round, unknown or
duplicate sender, wrong stage, wrong shape) and leaves the state unchanged; each ``close_*`` moves to the
next stage and raises ``below_threshold`` when fewer than t devices made it.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from fedge.core.secagg import (
    KEY_BYTES,
    SHARE_BYTES,
    RoundSetup,
    agree,
    combine_secret,
    pair_sign,
    prg,
    seed_commitment,
    usable_public_key,
)
from fedge.protocol.errors import SecAggError, SecAggFailure
from fedge.protocol.secagg_wire import (
    HUB,
    AdvertiseKeys,
    KeysBroadcast,
    MaskedInput,
    PeerKeys,
    RevealedShare,
    Sealed,
    ShareKeys,
    SharesRelay,
    UnmaskRequest,
    UnmaskResponse,
)

log = logging.getLogger("fedge.core.secagg_server")
_FromDevice = AdvertiseKeys | ShareKeys | MaskedInput | UnmaskResponse


@dataclass(frozen=True)
class SecAggResult:
    """The unmasked sum (ring elements) and who is in it."""

    total: NDArray[np.uint64]
    included: tuple[str, ...]              # U3: devices whose masked input is in the sum
    dropped_before_input: tuple[str, ...]  # U2 \ U3: their pairwise masks were removed via key shares
    unmask_responders: tuple[str, ...]     # U4


class SecAggServer:
    """The hub's side of one SecAgg+ round over ``dim`` ring elements."""

    def __init__(self, setup: RoundSetup, dim: int, min_inputs: int = 0) -> None:
        self.setup, self.dim = setup, dim
        # a round that cannot end with this many masked inputs fails before anything is unmasked (quorum, and the
        # distributed-DP cohort m: a sum with fewer inputs carries too little noise to be seen even by the hub)
        self.min_inputs = min_inputs
        self.stage = "advertise"
        self.adverts: dict[str, AdvertiseKeys] = {}
        self.shares: dict[str, ShareKeys] = {}
        self.masked: dict[str, NDArray[np.uint64]] = {}
        self.requests: dict[str, UnmaskRequest] = {}
        self.responses: dict[str, UnmaskResponse] = {}

    def _check(self, stage: str, msg: _FromDevice, allowed: Collection[str]) -> None:
        if msg.round_id != self.setup.round_id:
            raise SecAggError(SecAggFailure.WRONG_ROUND, f"{type(msg).__name__} of round {msg.round_id!r}")
        if msg.sender not in self.setup.cohort:
            raise SecAggError(SecAggFailure.UNKNOWN_SENDER, f"{msg.sender!r} is not in the cohort")
        if self.stage != stage:
            raise SecAggError(SecAggFailure.OUT_OF_ORDER, f"{type(msg).__name__} in stage {self.stage}")
        if msg.sender not in allowed:
            raise SecAggError(SecAggFailure.UNKNOWN_SENDER, f"{msg.sender!r} dropped out of an earlier stage")

    @staticmethod
    def _dup(seen: Collection[str], msg: _FromDevice) -> None:
        if msg.sender in seen:
            raise SecAggError(SecAggFailure.DUPLICATE, f"second {type(msg).__name__} from {msg.sender!r}")

    def _close(self, stage: str, nxt: str, arrived: int) -> None:
        if self.stage != stage:
            raise SecAggError(SecAggFailure.OUT_OF_ORDER, f"closing {stage} in stage {self.stage}")
        if arrived < self.setup.threshold:
            self.stage = "failed"
            detail = f"{arrived} devices finished {stage} < t={self.setup.threshold}"
            raise SecAggError(SecAggFailure.BELOW_THRESHOLD, detail)
        if stage != "unmask" and arrived < self.min_inputs:
            self.stage = "failed"
            detail = f"{arrived} devices finished {stage} < the {self.min_inputs} inputs the sum needs"
            raise SecAggError(SecAggFailure.BELOW_THRESHOLD, detail)
        self.stage = nxt

    def _links(self, u: str, within: Collection[str]) -> list[str]:
        return [v for v in self.setup.graph[u] if v in within]

    # stage 0 ---------------------------------------------------------------------------------------
    def receive_advertise(self, msg: AdvertiseKeys) -> None:
        """Accept a device's public keys."""
        self._check("advertise", msg, self.setup.cohort)
        self._dup(self.adverts, msg)
        if any(len(b) != KEY_BYTES for b in (msg.enc_pk, msg.mask_pk, msg.seed_commit)):
            raise SecAggError(SecAggFailure.MALFORMED, f"keys of {msg.sender!r} are not 32 bytes")
        for pk in (msg.enc_pk, msg.mask_pk):  # a low-order point would make every neighbour's agreement fail
            if not usable_public_key(pk):
                raise SecAggError(SecAggFailure.MALFORMED, f"a public key of {msg.sender!r} is a low-order point")
        self.adverts[msg.sender] = msg

    def close_advertise(self) -> dict[str, KeysBroadcast]:
        """U1 is fixed; each member gets its advertised neighbours' keys."""
        self._close("advertise", "share", len(self.adverts))
        rid = self.setup.round_id
        return {
            u: KeysBroadcast(rid, HUB, u, tuple(PeerKeys(v, self.adverts[v].enc_pk, self.adverts[v].mask_pk)
                                                 for v in self._links(u, self.adverts)))
            for u in self.adverts
        }

    # stage 1 ---------------------------------------------------------------------------------------
    def receive_shares(self, msg: ShareKeys) -> None:
        """Accept a device's sealed shares: exactly one per advertised neighbour (so masking is symmetric)."""
        self._check("share", msg, self.adverts)
        self._dup(self.shares, msg)
        to = sorted(s.peer for s in msg.shares)
        if to != self._links(msg.sender, self.adverts):
            raise SecAggError(SecAggFailure.PROTOCOL_VIOLATION, f"{msg.sender!r} did not share to its neighbours")
        self.shares[msg.sender] = msg

    def close_shares(self) -> dict[str, SharesRelay]:
        """U2 is fixed; each member gets the bundles its U2 neighbours sealed for it."""
        self._close("share", "mask", len(self.shares))
        # one pass over every bundle (O(n k)); a U2 member's bundles go exactly to its advertised neighbours
        # (receive_shares), so v's are those of its U2 neighbours; by sender id, the graph's order
        sealed_for: dict[str, list[Sealed]] = {v: [] for v in self.shares}
        for u in sorted(self.shares):
            for s in self.shares[u].shares:
                if s.peer in sealed_for:
                    sealed_for[s.peer].append(Sealed(u, s.ciphertext))
        return {v: SharesRelay(self.setup.round_id, HUB, v, tuple(sealed)) for v, sealed in sealed_for.items()}

    # stage 2 ---------------------------------------------------------------------------------------
    def receive_masked(self, msg: MaskedInput) -> None:
        """Accept a device's masked input."""
        self._check("mask", msg, self.shares)
        self._dup(self.masked, msg)
        if msg.ring_bits != self.setup.config.ring_bits:
            raise SecAggError(SecAggFailure.MALFORMED, f"ring of {msg.ring_bits} bits from {msg.sender!r}")
        y = msg.values()
        if y.size != self.dim:
            raise SecAggError(SecAggFailure.MALFORMED, f"{y.size} elements from {msg.sender!r}, expected {self.dim}")
        self.masked[msg.sender] = y & self.setup.mask

    def close_masked(self) -> dict[str, UnmaskRequest]:
        """U3 is fixed; each member is asked, per U2 neighbour, for exactly one kind of share."""
        self._close("mask", "unmask", len(self.masked))
        for v in self.masked:
            peers = self._links(v, self.shares)
            survivors = tuple(u for u in peers if u in self.masked)
            dropped = tuple(u for u in peers if u not in self.masked)
            self.requests[v] = UnmaskRequest(self.setup.round_id, HUB, v, survivors, dropped)
        return dict(self.requests)

    # stage 3 ---------------------------------------------------------------------------------------
    def receive_unmask(self, msg: UnmaskResponse) -> None:
        """Accept a device's revealed shares: exactly the ones it was asked for."""
        self._check("unmask", msg, self.masked)
        self._dup(self.responses, msg)
        req = self.requests[msg.sender]
        if tuple(s.peer for s in msg.seed_shares) != tuple(sorted(req.survivors)) or tuple(
            s.peer for s in msg.key_shares
        ) != tuple(sorted(req.dropped)):
            raise SecAggError(SecAggFailure.PROTOCOL_VIOLATION, f"{msg.sender!r} answered another request")
        if any(len(s.share) != SHARE_BYTES for s in msg.seed_shares + msg.key_shares):
            raise SecAggError(SecAggFailure.MALFORMED, f"a share from {msg.sender!r} is not {SHARE_BYTES} bytes")
        self.responses[msg.sender] = msg

    def _revealed(self, kind: str) -> dict[str, list[RevealedShare]]:
        """Every revealed share of ``kind`` (``seed`` or ``key``), by the peer it belongs to (one pass: O(n k))."""
        by_owner: dict[str, list[RevealedShare]] = {}
        for resp in self.responses.values():
            for s in resp.seed_shares if kind == "seed" else resp.key_shares:
                by_owner.setdefault(s.peer, []).append(s)
        return by_owner

    def _rebuild(self, owner: str, kind: str, revealed: dict[str, list[RevealedShare]]) -> bytes:
        shares = list(revealed.get(owner, ()))
        t = self.setup.threshold
        if len(shares) < t:
            raise SecAggError(SecAggFailure.BELOW_THRESHOLD, f"{len(shares)} {kind} shares of {owner!r} < t={t}")
        shares.sort(key=lambda s: s.index)
        return combine_secret([(s.index, s.share) for s in shares[:t]])

    def finish(self) -> SecAggResult:
        """Close the unmask stage and return the sum over U3 (raises ``below_threshold`` or ``bad_share``)."""
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        self._close("unmask", "done", len(self.responses))
        rid, bits, n = self.setup.round_id, self.setup.config.ring_bits, self.dim
        try:
            total = np.zeros(n, dtype=np.uint64)
            for y in self.masked.values():
                total += y
            seeds = self._revealed("seed")
            for u in self.masked:
                seed = self._rebuild(u, "seed", seeds)
                if seed_commitment(rid, u, seed) != self.adverts[u].seed_commit:
                    raise SecAggError(SecAggFailure.BAD_SHARE, f"seed of {u!r} does not match its commitment")
                total -= prg(seed, n, bits)
            dropped = [u for u in self.shares if u not in self.masked]
            keys = self._revealed("key")
            for u in dropped:
                partners = self._links(u, self.masked)
                if not partners:
                    continue
                sk = X25519PrivateKey.from_private_bytes(self._rebuild(u, "key", keys))
                if sk.public_key().public_bytes_raw() != self.adverts[u].mask_pk:
                    raise SecAggError(SecAggFailure.BAD_SHARE, f"mask key of {u!r} does not match its public key")
                for v in partners:
                    mask = prg(agree(sk, self.adverts[v].mask_pk, rid, "mask", u, v), n, bits)
                    total = total - mask if pair_sign(v, u) > 0 else total + mask
        except SecAggError:
            self.stage = "failed"
            raise
        log.info("secagg round %s: sum of %d inputs (%d dropped before input)", rid, len(self.masked), len(dropped))
        return SecAggResult(total & self.setup.mask, tuple(sorted(self.masked)), tuple(sorted(dropped)),
                            tuple(sorted(self.responses)))
