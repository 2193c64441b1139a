"""SecAgg+ server side: a transport-free state machine that collects stage messages, decides the survivors,
relays sealed shares it cannot read, and reconstructs only the sum (on the wire: `fedge.core.secagg_round`).

Survivor sets: U1 advertised keys, U2 sent its shares, U3 sent its masked input and was not named by a neighbour
whose copy of its share bundle did not open (such a sender is dropped like one that never sent its input: its
neighbours left it out of their masks), U4 answered the unmask request. The sum covers exactly U3. For each u in U3
its self-mask seed is rebuilt from t seed shares; for each u in U2 \\ U3 its mask key is rebuilt from t key shares
and its pairwise masks with the U3 devices that used them removed. A secret is rebuilt from any t of the shares
revealed for it that pass its check (commitment, public key); every share off that polynomial names its responder,
and :attr:`SecAggServer.blamed` records it, as it records a sender whose bundles two or more neighbours could not
open.
Each ``receive_*`` raises `SecAggError` with a reason for a message it rejects (wrong round, unknown or
duplicate sender, wrong stage, wrong shape) and leaves the state unchanged; each ``close_*`` moves to the
next stage and raises ``below_threshold`` when fewer than t devices made it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from fedge.core.secagg import (
    KEY_BYTES,
    SHARE_BYTES,
    RoundSetup,
    agree,
    pair_sign,
    prg,
    robust_secret,
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
    blamed: tuple[tuple[str, str], ...] = ()  # (device, what it did): shown to be responsible for a bad share


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
        self.rejected: dict[str, frozenset[str]] = {}  # U3 member -> neighbours whose bundle did not open for it
        self.survivors: set[str] = set()  # U3: the masked inputs in the sum
        self.blamed: dict[str, str] = {}  # device -> what it did (bad bundles, bad shares, false accusations)

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
        rejected = frozenset(msg.rejected)
        if len(rejected) != len(msg.rejected) or not rejected <= set(self._links(msg.sender, self.shares)):
            raise SecAggError(SecAggFailure.PROTOCOL_VIOLATION, f"{msg.sender!r} rejected bundles of devices that "
                              "sent it none")
        self.masked[msg.sender] = y & self.setup.mask
        self.rejected[msg.sender] = rejected

    def _accusations(self) -> dict[str, set[str]]:
        """Device -> the masked-input senders that could not open its share bundle."""
        out: dict[str, set[str]] = {}
        for u, rejected in self.rejected.items():
            for v in rejected:
                out.setdefault(v, set()).add(u)
        return out

    def close_masked(self) -> dict[str, UnmaskRequest]:
        """U3 is fixed (the masked inputs, less every sender a neighbour could not open); each member is asked, per
        U2 neighbour whose bundle it opened, for exactly one kind of share."""
        accused = self._accusations()
        for v, accusers in sorted(accused.items()):
            if len(accusers) >= 2:
                self.blamed[v] = (f"its share bundles did not open for {len(accusers)} neighbours "
                                  f"({', '.join(sorted(accusers))})")
        for u, rejected in sorted(self.rejected.items()):
            alone = sorted(v for v in rejected if accused[v] == {u})
            if len(alone) >= 2 and u not in self.blamed:
                self.blamed[u] = f"said the bundles of {', '.join(alone)} did not open; no other neighbour did"
        self.survivors = {v for v in self.masked if v not in accused}
        if accused:
            log.warning("secagg round %s: dropped %s (their share bundles did not open for a neighbour)",
                        self.setup.round_id, sorted(set(accused) & set(self.masked)))
        self._close("mask", "unmask", len(self.survivors))
        for v in sorted(self.survivors):
            peers = [u for u in self._links(v, self.shares) if u not in self.rejected[v]]
            survivors = tuple(u for u in peers if u in self.survivors)
            dropped = tuple(u for u in peers if u not in self.survivors)
            self.requests[v] = UnmaskRequest(self.setup.round_id, HUB, v, survivors, dropped)
        return dict(self.requests)

    # stage 3 ---------------------------------------------------------------------------------------
    def receive_unmask(self, msg: UnmaskResponse) -> None:
        """Accept a device's revealed shares: exactly the ones it was asked for."""
        self._check("unmask", msg, self.requests)
        self._dup(self.responses, msg)
        req = self.requests[msg.sender]
        if tuple(s.peer for s in msg.seed_shares) != tuple(sorted(req.survivors)) or tuple(
            s.peer for s in msg.key_shares
        ) != tuple(sorted(req.dropped)):
            raise SecAggError(SecAggFailure.PROTOCOL_VIOLATION, f"{msg.sender!r} answered another request")
        if any(len(s.share) != SHARE_BYTES for s in msg.seed_shares + msg.key_shares):
            raise SecAggError(SecAggFailure.MALFORMED, f"a share from {msg.sender!r} is not {SHARE_BYTES} bytes")
        self.responses[msg.sender] = msg

    def _revealed(self, kind: str) -> dict[str, list[tuple[str, int, bytes]]]:
        """Every revealed share of ``kind`` (``seed`` or ``key``) as ``(responder, index, share)``, by the peer it
        belongs to (one pass: O(n k))."""
        by_owner: dict[str, list[tuple[str, int, bytes]]] = {}
        for resp in self.responses.values():
            for s in resp.seed_shares if kind == "seed" else resp.key_shares:
                by_owner.setdefault(s.peer, []).append((resp.sender, s.index, s.share))
        return by_owner

    def _rebuild(self, owner: str, kind: str, revealed: dict[str, list[tuple[str, int, bytes]]],
                 check: Callable[[bytes], bool]) -> bytes:
        """``owner``'s secret from any t revealed shares that pass ``check``; responders of shares off its polynomial
        are blamed."""
        try:
            secret, bad = robust_secret(list(revealed.get(owner, ())), self.setup.threshold, check)
        except SecAggError as exc:
            raise SecAggError(exc.reason, f"{kind} shares of {owner!r}: {exc.detail}") from exc
        for r in bad:
            self.blamed.setdefault(r, f"revealed a {kind} share of {owner!r} that does not fit its secret")
        return secret

    def finish(self) -> SecAggResult:
        """Close the unmask stage and return the sum over U3 (raises ``below_threshold`` or ``bad_share``)."""
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        self._close("unmask", "done", len(self.responses))
        rid, bits, n = self.setup.round_id, self.setup.config.ring_bits, self.dim
        included = sorted(self.survivors)
        try:
            total = np.zeros(n, dtype=np.uint64)
            for u in included:
                total += self.masked[u]
            seeds = self._revealed("seed")
            for u in included:
                seed = self._rebuild(u, "seed", seeds, _commits_to(rid, u, self.adverts[u].seed_commit))
                total -= prg(seed, n, bits)
            dropped = [u for u in self.shares if u not in self.survivors]
            keys = self._revealed("key")
            for u in dropped:
                # the U3 devices that added a mask with u: every neighbour in U3 that opened u's bundle
                partners = [v for v in self._links(u, self.survivors) if u not in self.rejected.get(v, ())]
                if not partners:
                    continue
                raw = self._rebuild(u, "key", keys, _keys_to(self.adverts[u].mask_pk))
                sk = X25519PrivateKey.from_private_bytes(raw)
                for v in partners:
                    mask = prg(agree(sk, self.adverts[v].mask_pk, rid, "mask", u, v), n, bits)
                    total = total - mask if pair_sign(v, u) > 0 else total + mask
        except SecAggError:
            self.stage = "failed"
            raise
        log.info("secagg round %s: sum of %d inputs (%d dropped before input)", rid, len(included), len(dropped))
        return SecAggResult(total & self.setup.mask, tuple(included), tuple(sorted(dropped)),
                            tuple(sorted(self.responses)), tuple(sorted(self.blamed.items())))


def _commits_to(round_id: str, device: str, commitment: bytes) -> Callable[[bytes], bool]:
    """The check of a rebuilt self-mask seed: its commitment is the advertised one."""
    return lambda seed: seed_commitment(round_id, device, seed) == commitment


def _keys_to(public: bytes) -> Callable[[bytes], bool]:
    """The check of a rebuilt mask key: its public key is the advertised one."""
    return lambda private: _public_of(private) == public


def _public_of(private: bytes) -> bytes:
    """The X25519 public key of a 32-byte private key (empty for anything else)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    try:
        return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()
    except ValueError:
        return b""
