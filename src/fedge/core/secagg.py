"""SecAgg+ (Bell et al. 2020): the shared math and the device side, as a transport-free state machine.

Transport-free; `fedge.core.secagg_session` puts it on the wire (PROTOCOL.md §9). The hub side is
`fedge.core.secagg_server`. Primitives come from libraries, imported lazily (``cryptography``): X25519, HKDF-SHA256
salted with the round id, ChaCha20 keystreams as the mask PRG and AES-GCM for the relayed shares
(``cryptography``); Shamir sharing over the prime field GF(2^256 + 297) on Python ints, one 33-byte share
value per 32-byte secret.

A device masks its quantised update ``x`` as ``y = x + PRG(b) + Σ_v ±PRG(agree(s_u, s_v)) mod 2^bits`` over
its neighbours ``v`` in a public random graph; ``+`` when ``u < v``. It Shamir-shares ``b`` and its mask
private key ``s_sk`` to those neighbours, and in the unmasking stage reveals, per neighbour, exactly one of
them: the seed share if the neighbour's masked input arrived, the key share if it did not. Never both.
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedge.protocol.configdoc import doc
from fedge.protocol.errors import ConfigError, SecAggError, SecAggFailure
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

KEY_BYTES = 32


@dataclass(frozen=True)
class SecAggConfig:
    """Secure-aggregation parameters of a round (the hub's ``[secagg]`` section, announced as ``secagg_*``)."""

    degree: int = field(default=0, metadata=doc("neighbours k per device; 0 = 2*ceil(log2 n)", example=8))
    threshold: int = field(default=0, metadata=doc("Shamir threshold t (k/2 < t <= k); 0 = k//2 + 1", example=5))
    ring_bits: int = field(default=32, metadata=doc("the sum is computed modulo 2**ring_bits (8..62)", example=32))
    clip: float = field(default=1.0, metadata=doc("each coordinate is clipped to [-clip, clip]", example=1.0))
    scale: float = field(default=65536.0, metadata=doc("q = round(x * scale)", example=65536.0))
    stochastic: bool = field(default=False, metadata=doc("unbiased stochastic rounding, not nearest", example=True))
    l2_clip: float = field(default=0.0, metadata=doc(
        "each update is first clipped to this L2 norm (0: no L2 clip, only the per-coordinate one)", example=1.0))
    norm_bit: bool = field(default=False, metadata=doc(
        "the input carries one more coordinate: clip if the update's norm was at most l2_clip, else 0 (the hub "
        "learns how many devices were under the bound, nothing else)", example=True))

    def __post_init__(self) -> None:
        if not 8 <= self.ring_bits <= 62:
            raise ConfigError("secagg.ring_bits", f"must be in 8..62, got {self.ring_bits}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError("secagg.clip", f"must be a positive number, got {self.clip}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError("secagg.scale", f"must be a positive number, got {self.scale}")
        if self.degree < 0 or self.threshold < 0:
            raise ConfigError("secagg.degree", "degree and threshold must be >= 0 (0 = automatic)")
        if not (math.isfinite(self.l2_clip) and self.l2_clip >= 0):
            raise ConfigError("secagg.l2_clip", f"must be a number >= 0, got {self.l2_clip}")
        if self.norm_bit and not self.l2_clip:
            raise ConfigError("secagg.l2_clip", "the norm bit needs an L2 clip")

    @property
    def max_abs_q(self) -> int:
        """The largest |q| a clipped coordinate can quantise to."""
        return math.ceil(self.clip * self.scale)

    def check_capacity(self, n: int) -> None:
        """Raise `ConfigError` unless the sum of ``n`` quantised updates fits the centred ring."""
        if n * self.max_abs_q >= 2 ** (self.ring_bits - 1):
            raise ConfigError(
                "secagg.scale",
                f"{n} devices x max |q| {self.max_abs_q} overflow the ring 2^{self.ring_bits}: "
                "lower scale or clip, or raise ring_bits",
            )


def quantise(update: NDArray[Any], cfg: SecAggConfig, rng: np.random.Generator | None = None) -> NDArray[np.uint64]:
    """Clip to [-clip, clip], scale, round (stochastically with ``rng`` if configured), map into the ring."""
    x = np.clip(np.asarray(update, dtype=np.float64).ravel(), -cfg.clip, cfg.clip) * cfg.scale
    if cfg.stochastic:
        if rng is None:
            raise ConfigError("secagg.stochastic", "stochastic rounding needs a random generator")
        q = np.floor(x + rng.random(x.shape))
    else:
        q = np.rint(x)
    return q.astype(np.int64).astype(np.uint64) & np.uint64((1 << cfg.ring_bits) - 1)


def bounded_input(flat: NDArray[Any], cfg: SecAggConfig) -> NDArray[np.float64]:
    """The vector a device quantises: its flattened update clipped to L2 norm ``l2_clip`` (when set), followed by the
    norm bit (when asked: ``clip`` if the update's norm was at most ``l2_clip``, else 0)."""
    x = np.asarray(flat, dtype=np.float64).ravel()
    norm = float(np.linalg.norm(x))
    if cfg.l2_clip and norm > cfg.l2_clip:
        x = x * (cfg.l2_clip / norm)
    if cfg.norm_bit:
        x = np.append(x, cfg.clip if norm <= cfg.l2_clip else 0.0)
    return x


def centred(total: NDArray[np.uint64], cfg: SecAggConfig) -> NDArray[np.int64]:
    """A ring vector as centred integers in [-2^(bits-1), 2^(bits-1))."""
    v = np.asarray(total, dtype=np.uint64) & np.uint64((1 << cfg.ring_bits) - 1)
    signed = v.astype(np.int64)
    signed[v >= np.uint64(1 << (cfg.ring_bits - 1))] -= np.int64(1 << cfg.ring_bits)
    return signed


def sum_problem(total: NDArray[np.uint64], count: int, cfg: SecAggConfig, noise_std: float = 0.0) -> str | None:
    """Why the unmasked ring sum of ``count`` inputs cannot be the sum of ``count`` honest inputs (None: it can).

    An honest input is quantised from coordinates within ``[-clip, clip]`` (so the sum's are within ``count x``
    that), its update part has L2 norm at most ``l2_clip`` plus its rounding (at most one step per coordinate)
    and plus, under distributed DP, its noise share of std ``noise_std`` per coordinate (bounded as honest noise
    never exceeds: ``noise_std sqrt(count) (sqrt(d) + 10)`` for the sum); its norm bit is 0 or ``clip``."""
    q = centred(total, cfg)
    limit = count * cfg.max_abs_q
    over = np.flatnonzero(np.abs(q) > limit)
    if over.size:
        j = int(over[0])
        return (f"{over.size} coordinates of the sum are beyond what {count} inputs clipped to {cfg.clip:g} can "
                f"reach (coordinate {j}: {abs(int(q[j])) / cfg.scale:.6g} > {limit / cfg.scale:.6g})")
    update = q[:-1] if cfg.norm_bit else q
    if cfg.norm_bit and q[-1] < 0:
        return f"the norm bits sum to {q[-1] / cfg.scale:.6g} < 0"
    if cfg.l2_clip:
        dim = update.size
        step = 1.0 / cfg.scale
        bound = count * (cfg.l2_clip + step * math.sqrt(dim)) + noise_std * math.sqrt(count) * (math.sqrt(dim) + 10)
        norm = float(np.linalg.norm(update.astype(np.float64))) / cfg.scale
        if norm > bound:
            return (f"the sum's L2 norm {norm:.6g} is beyond what {count} inputs clipped to L2 norm {cfg.l2_clip:g} "
                    f"can reach ({bound:.6g})")
    return None


def under_bound(total: NDArray[np.uint64], count: int, cfg: SecAggConfig) -> float | None:
    """The share of a round's inputs whose update was within the L2 clip, from the norm bits' sum (None without)."""
    if not cfg.norm_bit or count < 1:
        return None
    return float(min(max(centred(total, cfg)[-1] / (cfg.clip * cfg.scale * count), 0.0), 1.0))


def next_l2_clip(current: float, under: float, target: float = 0.5, rate: float = 0.2) -> float:
    """Adaptive clipping (Andrew et al. 2021, geometric update): the L2 clip moves toward the ``target`` quantile of
    the devices' update norms, by a factor ``exp(-rate (under - target))`` per round; one device changes ``under``
    by 1/n, so it can shift the quantile the clip tracks by no more than that."""
    return current * math.exp(-rate * (under - target))


def dequantise(total: NDArray[np.uint64], cfg: SecAggConfig) -> NDArray[np.float64]:
    """The centred integer value of a ring vector (a sum of quantised updates) divided by the scale."""
    v = np.asarray(total, dtype=np.uint64) & np.uint64((1 << cfg.ring_bits) - 1)
    signed = v.astype(np.int64)
    signed[v >= np.uint64(1 << (cfg.ring_bits - 1))] -= np.int64(1 << cfg.ring_bits)
    return signed.astype(np.float64) / cfg.scale


def _rank(seed: bytes, device: str) -> bytes:
    return hashlib.sha256(b"fedge-secagg/graph\x00" + seed + device.encode()).digest()


def neighbour_graph(cohort: tuple[str, ...], degree: int, seed: bytes) -> dict[str, tuple[str, ...]]:
    """A random k-regular graph every party derives alike: the cohort is placed on a cycle in the order of
    ``sha256(seed, id)`` and each device is joined to its ``ceil(k/2)`` nearest on each side (a random
    Harary graph, as in SecAgg+); the complete graph when that reaches ``n - 1``."""
    order = cycle_order(cohort, seed)
    return {d: _neighbours(order, i, degree) for i, d in enumerate(order)}


def cycle_order(cohort: tuple[str, ...], seed: bytes) -> list[str]:
    """The cohort in the order of ``sha256(seed, id)``: the cycle the neighbour graph is drawn on."""
    return sorted(cohort, key=lambda d: _rank(seed, d))


def _neighbours(order: list[str], i: int, degree: int) -> tuple[str, ...]:
    n, half = len(order), (degree + 1) // 2
    if 2 * half >= n - 1:
        return tuple(sorted(p for j, p in enumerate(order) if j != i))
    return tuple(sorted({order[(i + j) % n] for j in range(-half, half + 1) if j}))


@dataclass(frozen=True)
class RoundSetup:
    """What every party of a SecAgg round agrees on in public: round id, cohort, graph seed, config."""

    round_id: str
    cohort: tuple[str, ...]
    seed: bytes
    config: SecAggConfig = SecAggConfig()

    def __post_init__(self) -> None:
        if len(set(self.cohort)) != len(self.cohort) or HUB in self.cohort or len(self.cohort) < 2:
            raise ConfigError("secagg.cohort", "needs two or more distinct device ids (not 'hub')")
        if not self.threshold > self.degree / 2 or self.threshold > self.degree:
            raise ConfigError("secagg.threshold", f"t={self.threshold} must satisfy k/2 < t <= k (k={self.degree})")
        self.config.check_capacity(len(self.cohort))

    @cached_property
    def degree(self) -> int:
        """The graph degree k actually used (every device has exactly this many neighbours)."""
        n = len(self.cohort)
        want = self.config.degree or 2 * math.ceil(math.log2(n))
        return n - 1 if 2 * ((want + 1) // 2) >= n - 1 else 2 * ((want + 1) // 2)

    @cached_property
    def threshold(self) -> int:
        """The Shamir threshold t."""
        return self.config.threshold or self.degree // 2 + 1

    @cached_property
    def graph(self) -> dict[str, tuple[str, ...]]:
        """Each device's neighbours, sorted."""
        return neighbour_graph(self.cohort, self.degree, self.seed)

    def neighbours(self, device: str) -> tuple[str, ...]:
        """One device's neighbours, sorted (without building the whole graph: what a device needs)."""
        if "graph" in self.__dict__:
            return self.graph[device]
        order = self._order
        return _neighbours(order, order.index(device), self.degree)

    @cached_property
    def _order(self) -> list[str]:
        return cycle_order(self.cohort, self.seed)

    @property
    def mask(self) -> np.uint64:
        """``2**ring_bits - 1``."""
        return np.uint64((1 << self.config.ring_bits) - 1)


def kdf(shared: bytes, round_id: str, label: str, a: str, b: str) -> bytes:
    """HKDF-SHA256 salted with the round id, bound to a purpose label and the (unordered) pair of ids."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    lo, hi = sorted((a, b))
    info = b"\x00".join([b"fedge-secagg", label.encode(), lo.encode(), hi.encode()])
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=round_id.encode(), info=info).derive(shared)


def agree(private: Any, peer_public: bytes, round_id: str, label: str, me: str, peer: str) -> bytes:
    """X25519 agreement of our private key with a peer's raw public key, through `kdf`."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # wrong size, or a low-order point (all-zero shared secret)
        raise SecAggError(SecAggFailure.MALFORMED, f"bad public key of {peer!r}: {exc}") from exc
    return kdf(shared, round_id, label, me, peer)


_PROBE = bytes([9]) + bytes(31)  # a fixed, valid X25519 private scalar: only used to test public keys


def usable_public_key(raw: bytes) -> bool:
    """A 32-byte X25519 public key whose agreement with a fixed scalar is not all zeros (not a low-order point)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    try:
        X25519PrivateKey.from_private_bytes(_PROBE).exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        return False
    return True


def prg(seed: bytes, length: int, ring_bits: int) -> NDArray[np.uint64]:
    """``length`` ring elements from the ChaCha20 keystream under the 32-byte ``seed``."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    width = 4 if ring_bits <= 32 else 8
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update(bytes(width * length))
    return np.frombuffer(stream, dtype=f"<u{width}").astype(np.uint64) & np.uint64((1 << ring_bits) - 1)


SHAMIR_PRIME = 2**256 + 297  # the least prime above 2^256: a 32-byte secret is one field element
SHARE_BYTES = 33  # a share value: one element of GF(SHAMIR_PRIME), fixed-width big-endian
MAX_SHARES = 0xFFFF  # share indices travel as u16 in the sealed bundle


def _split_with(secret: int, coeffs: list[int], count: int) -> list[tuple[int, bytes]]:
    """Shares ``(x, f(x))`` for x = 1..count of ``f(x) = secret + c1 x + c2 x^2 + ...`` mod p (Horner)."""
    poly = [secret, *coeffs][::-1]
    shares = []
    for x in range(1, count + 1):
        acc = 0
        for c in poly:
            acc = (acc * x + c) % SHAMIR_PRIME
        shares.append((x, acc.to_bytes(SHARE_BYTES, "big")))
    return shares


def split_secret(secret: bytes, threshold: int, count: int) -> list[tuple[int, bytes]]:
    """Shamir-share a 32-byte secret over GF(`SHAMIR_PRIME`): ``count`` shares ``(index, SHARE_BYTES bytes)``,
    any ``threshold`` of them recover it, fewer reveal nothing. Costs O(count * threshold) multiplications."""
    if len(secret) != KEY_BYTES:
        raise ValueError("secrets are 32 bytes")
    if not 1 <= threshold <= count <= MAX_SHARES:
        raise ValueError(f"need 1 <= threshold <= count <= {MAX_SHARES}, got t={threshold} n={count}")
    coeffs = [secrets.randbelow(SHAMIR_PRIME) for _ in range(threshold - 1)]
    return _split_with(int.from_bytes(secret, "big"), coeffs, count)


def combine_secret(shares: list[tuple[int, bytes]]) -> bytes:
    """Recover a 32-byte secret from shares of `split_secret` by Lagrange interpolation at 0 (exactly the
    threshold of them suffices; O(len(shares)^2) multiplications and one inverse per share).

    Empty input, a share of the wrong length, a value >= p, index 0 or a repeated index, or a result that
    is not a 32-byte secret (inconsistent shares) raise ``SecAggError(malformed)``."""
    xs = [i for i, _ in shares]
    if not shares or any(len(s) != SHARE_BYTES for _, s in shares) or len(set(xs)) != len(xs):
        raise SecAggError(SecAggFailure.MALFORMED, f"shares must be {SHARE_BYTES} bytes with distinct indices")
    ys = [int.from_bytes(s, "big") for _, s in shares]
    if any(not 1 <= x <= MAX_SHARES for x in xs) or any(y >= SHAMIR_PRIME for y in ys):
        raise SecAggError(SecAggFailure.MALFORMED, "a share index or value is out of range")
    total = 0
    for j, (xj, yj) in enumerate(zip(xs, ys, strict=True)):
        num = den = 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % SHAMIR_PRIME
                den = den * (xm - xj) % SHAMIR_PRIME
        total = (total + yj * num * pow(den, -1, SHAMIR_PRIME)) % SHAMIR_PRIME
    if total >= 1 << (8 * KEY_BYTES):
        raise SecAggError(SecAggFailure.MALFORMED, "shares interpolate to no 32-byte secret")
    return total.to_bytes(KEY_BYTES, "big")


def lagrange_values(points: list[tuple[int, int]], xs: list[int]) -> list[int]:
    """The values at ``xs`` of the polynomial of degree < len(points) through ``points`` (distinct x, over
    GF(`SHAMIR_PRIME`)): each basis polynomial's denominator is inverted once for all ``xs``, and each numerator
    ``prod_{m != j} (x - x_m)`` comes from prefix and suffix products, so a value costs O(len(points))
    multiplications and no inverse (the hub checks every revealed share against the reconstructed polynomial)."""
    p = SHAMIR_PRIME
    px = [xj for xj, _ in points]
    coef = []
    for j, (xj, yj) in enumerate(points):
        den = 1
        for m, xm in enumerate(px):
            if m != j:
                den = den * (xj - xm) % p
        coef.append(yj * pow(den, -1, p) % p)
    out = []
    n = len(px)
    for x in xs:
        diffs = [(x - xm) % p for xm in px]
        suffix = [1] * (n + 1)
        for m in range(n - 1, -1, -1):
            suffix[m] = suffix[m + 1] * diffs[m] % p
        total, prefix = 0, 1
        for j in range(n):
            total = (total + coef[j] * prefix % p * suffix[j + 1]) % p
            prefix = prefix * diffs[j] % p
        out.append(total)
    return out


def robust_secret(shares: list[tuple[str, int, bytes]], threshold: int, check: Callable[[bytes], bool],
                  max_tries: int = 4096) -> tuple[bytes, list[str]]:
    """Rebuild a secret from ``(responder, index, share)`` triples when some shares may be bad: try ``threshold``
    of them (leaving out more and more of the others) until the secret passes ``check`` (its commitment or public
    key); then every share off the polynomial those define names its responder. Returns the secret and the
    responders of bad shares, sorted. ``SecAggError`` (``below_threshold``, or ``bad_share`` when no tried subset
    passes) otherwise."""
    from itertools import combinations

    items = sorted(shares, key=lambda s: (s[1], s[0]))
    m = len(items)
    if m < threshold:
        raise SecAggError(SecAggFailure.BELOW_THRESHOLD, f"{m} shares < t={threshold}")
    tried: set[tuple[int, ...]] = set()
    for left_out in range(m - threshold + 1):
        for drop in combinations(range(m), left_out):
            keep = tuple(i for i in range(m) if i not in drop)[:threshold]
            if keep in tried:
                continue
            tried.add(keep)
            if len(tried) > max_tries:
                raise SecAggError(SecAggFailure.BAD_SHARE, f"no {threshold} of {m} shares agree in {max_tries} tries")
            chosen = [items[i] for i in keep]
            try:
                secret = combine_secret([(i, v) for _, i, v in chosen])
            except SecAggError:
                continue
            if not check(secret):
                continue
            points = [(i, int.from_bytes(v, "big")) for _, i, v in chosen]
            kept = set(keep)  # the chosen shares define the polynomial: only the others are checked (by position:
            others = [items[k] for k in range(m) if k not in kept]  # a share may claim another's index)
            xs = [i for _, i, _ in others if 1 <= i <= MAX_SHARES]
            expected = dict(zip(xs, lagrange_values(points, xs), strict=True))
            bad = {r for r, i, v in others if i not in expected or int.from_bytes(v, "big") != expected[i]}
            return secret, sorted(bad)
    raise SecAggError(SecAggFailure.BAD_SHARE, f"no {threshold} of the {m} shares give a secret that checks")


def seed_commitment(round_id: str, device: str, seed: bytes) -> bytes:
    """SHA-256 commitment to a self-mask seed, so a reconstruction from bad shares is detected."""
    return hashlib.sha256(b"\x00".join([b"fedge-secagg/seed", round_id.encode(), device.encode(), seed])).digest()


def share_ad(round_id: str, sender: str, receiver: str) -> bytes:
    """AES-GCM associated data of a sealed share bundle: round id, sender, receiver."""
    return b"".join(struct.pack(">H", len(p)) + p for p in (round_id.encode(), sender.encode(), receiver.encode()))


def pair_sign(me: str, peer: str) -> int:
    """+1 if ``me`` adds the pairwise mask with ``peer``, -1 if it subtracts it."""
    return 1 if me < peer else -1


class SecAggDevice:
    """One device's side of a SecAgg+ round: ``advertise`` → ``share_keys`` → ``masked_input`` → ``unmask``.

    Each call checks the round id, the receiver and the stage; a hub that breaks the protocol (asks for
    both shares of one peer, asks twice, names strangers) makes the device abort: every later call raises
    ``SecAggError(aborted)``. Secrets stay in memory and are never in any message except as shares."""

    def __init__(self, setup: RoundSetup, device_id: str) -> None:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        if device_id not in setup.cohort:
            raise ConfigError("secagg.cohort", f"device {device_id!r} is not in the cohort")
        self.setup, self.me = setup, device_id
        self._enc_sk, self._mask_sk = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        self._seed = os.urandom(KEY_BYTES)
        self._peers: dict[str, PeerKeys] = {}
        self._held: dict[str, tuple[int, bytes, bytes]] = {}  # peer -> (index, seed share, key share)
        self._share_keys: dict[str, bytes] = {}  # peer -> AES-GCM key of our share bundles (both directions)
        self._stage = "advertise"

    def _enter(self, stage: str, msg: KeysBroadcast | SharesRelay | UnmaskRequest | None) -> None:
        if self._stage == "aborted":
            raise SecAggError(SecAggFailure.ABORTED, f"{self.me} aborted this round")
        if msg is not None:
            if msg.round_id != self.setup.round_id:
                raise SecAggError(SecAggFailure.WRONG_ROUND, f"message of round {msg.round_id!r}")
            if msg.sender != HUB or msg.receiver != self.me:
                raise SecAggError(SecAggFailure.UNKNOWN_SENDER, f"from {msg.sender!r} to {msg.receiver!r}")
        if self._stage != stage:
            self._abort(SecAggFailure.OUT_OF_ORDER, f"{stage} while in stage {self._stage}")

    def _abort(self, reason: SecAggFailure, detail: str) -> None:
        self._stage = "aborted"
        self._seed, self._held, self._share_keys = b"", {}, {}
        raise SecAggError(reason, f"{self.me} aborts: {detail}")

    def advertise(self) -> AdvertiseKeys:
        """Stage 0: the two public keys and the seed commitment."""
        self._enter("advertise", None)
        self._stage = "share"
        return AdvertiseKeys(
            self.setup.round_id, self.me, self._enc_sk.public_key().public_bytes_raw(),
            self._mask_sk.public_key().public_bytes_raw(), seed_commitment(self.setup.round_id, self.me, self._seed),
        )

    def share_keys(self, msg: KeysBroadcast) -> ShareKeys:
        """Stage 1: Shamir-share the seed and the mask key to the neighbours that advertised, sealed."""
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._enter("share", msg)
        names = [p.peer for p in msg.peers]
        neighbours = set(self.setup.neighbours(self.me))
        if len(set(names)) != len(names) or not set(names) <= neighbours:
            self._abort(SecAggFailure.PROTOCOL_VIOLATION, "key list names non-neighbours or repeats")
        if any(len(p.enc_pk) != KEY_BYTES or len(p.mask_pk) != KEY_BYTES for p in msg.peers):
            self._abort(SecAggFailure.MALFORMED, "a public key is not 32 bytes")
        if len(names) < self.setup.threshold:
            self._abort(SecAggFailure.BELOW_THRESHOLD, f"{len(names)} neighbours < t={self.setup.threshold}")
        self._peers = {p.peer: p for p in msg.peers}
        order = sorted(names)
        t = self.setup.threshold
        seed_shares = split_secret(self._seed, t, len(order))
        key_shares = split_secret(self._mask_sk.private_bytes_raw(), t, len(order))
        sealed = []
        for peer, (idx, sb), (_, sk) in zip(order, seed_shares, key_shares, strict=True):
            key = agree(self._enc_sk, self._peers[peer].enc_pk, self.setup.round_id, "share", self.me, peer)
            self._share_keys[peer] = key  # the same key opens what the peer sealed for us
            nonce = os.urandom(12)
            body = struct.pack(">H", idx) + sb + sk
            ct = AESGCM(key).encrypt(nonce, body, share_ad(self.setup.round_id, self.me, peer))
            sealed.append(Sealed(peer, nonce + ct))
        self._stage = "mask"
        return ShareKeys(self.setup.round_id, self.me, tuple(sealed))

    def _open(self, item: Sealed) -> tuple[int, bytes, bytes]:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        key = self._share_keys[item.peer]  # derived when we sealed our bundle for this peer
        try:
            ad = share_ad(self.setup.round_id, item.peer, self.me)
            body = AESGCM(key).decrypt(item.ciphertext[:12], item.ciphertext[12:], ad)
        except (InvalidTag, ValueError) as exc:
            raise SecAggError(SecAggFailure.BAD_CIPHERTEXT, f"share from {item.peer!r} fails authentication") from exc
        if len(body) != 2 + 2 * SHARE_BYTES:
            raise SecAggError(SecAggFailure.MALFORMED, f"share bundle from {item.peer!r} has {len(body)} bytes")
        return struct.unpack(">H", body[:2])[0], body[2 : 2 + SHARE_BYTES], body[2 + SHARE_BYTES :]

    def masked_input(self, msg: SharesRelay, q: NDArray[np.uint64]) -> MaskedInput:
        """Stage 2: open the relayed shares, then mask the quantised update ``q``. A bundle that does not open
        (garbage, tampered, swapped) is its sender dropping out: left out of the masks and named in ``rejected``, so
        the hub drops it from the round and never asks this device for its shares."""
        self._enter("mask", msg)
        senders = [s.peer for s in msg.shares]
        if len(set(senders)) != len(senders) or not set(senders) <= set(self._peers):
            self._abort(SecAggFailure.PROTOCOL_VIOLATION, "relay names peers that got no keys from us, or repeats")
        held: dict[str, tuple[int, bytes, bytes]] = {}
        rejected: list[str] = []
        for s in msg.shares:
            try:
                held[s.peer] = self._open(s)
            except SecAggError:
                rejected.append(s.peer)
        if len(held) < self.setup.threshold:
            self._abort(SecAggFailure.BELOW_THRESHOLD, f"{len(held)} neighbours shared keys < t={self.setup.threshold}"
                        + (f" ({len(rejected)} bundles did not open)" if rejected else ""))
        self._held = held
        bits, rid = self.setup.config.ring_bits, self.setup.round_id
        y = (np.asarray(q, dtype=np.uint64).ravel() & self.setup.mask) + prg(self._seed, q.size, bits)
        for peer in sorted(held):
            seed = agree(self._mask_sk, self._peers[peer].mask_pk, rid, "mask", self.me, peer)
            y = y + prg(seed, q.size, bits) if pair_sign(self.me, peer) > 0 else y - prg(seed, q.size, bits)
        y &= self.setup.mask
        self._stage = "unmask"
        width = 4 if bits <= 32 else 8
        return MaskedInput(rid, self.me, bits, y.astype(f"<u{width}").tobytes(), tuple(sorted(rejected)))

    def unmask(self, msg: UnmaskRequest) -> UnmaskResponse:
        """Stage 3: reveal the seed share of each listed survivor, the key share of each listed dropped peer.

        Aborts if one peer is in both lists, if a peer is unknown or repeated, or on any second request."""
        self._enter("unmask", msg)
        surv, drop = set(msg.survivors), set(msg.dropped)
        if surv & drop:
            self._abort(SecAggFailure.PROTOCOL_VIOLATION, f"asked for both shares of {sorted(surv & drop)}")
        if len(surv) + len(drop) != len(msg.survivors) + len(msg.dropped) or not (surv | drop) <= set(self._held):
            self._abort(SecAggFailure.PROTOCOL_VIOLATION, "unmask request names unknown peers or repeats")
        seed = tuple(RevealedShare(p, self._held[p][0], self._held[p][1]) for p in sorted(surv))
        keys = tuple(RevealedShare(p, self._held[p][0], self._held[p][2]) for p in sorted(drop))
        self._stage = "done"
        self._seed, self._held, self._share_keys = b"", {}, {}
        return UnmaskResponse(self.setup.round_id, self.me, seed, keys)
