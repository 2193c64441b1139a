"""SecAgg+ library (fedge.core.secagg, fedge.core.secagg_server): exact sums with dropouts, the one-share rule,
authenticated relayed shares, replay rejection, uniform-looking masked inputs, Shamir and quantisation.

Every stage message passes through its byte encoding, as it will on the wire."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedge.core.secagg import (
    SHAMIR_PRIME,
    SHARE_BYTES,
    RoundSetup,
    SecAggConfig,
    SecAggDevice,
    _split_with,
    combine_secret,
    dequantise,
    neighbour_graph,
    quantise,
    split_secret,
)
from fedge.core.secagg_server import SecAggResult, SecAggServer
from fedge.protocol.errors import ConfigError, SecAggError, SecAggFailure
from fedge.protocol.secagg_wire import (
    HUB,
    MaskedInput,
    Sealed,
    SharesRelay,
    StageMessage,
    UnmaskRequest,
    decode,
    encode,
)

DIM = 512


def wire(msg: StageMessage) -> StageMessage:
    """What the other side sees: the message after its byte encoding (and a check that it round-trips)."""
    out = decode(encode(msg))
    assert out == msg
    return out


def ids(n: int) -> tuple[str, ...]:
    return tuple(f"dev-{i:03d}" for i in range(n))


@dataclass
class Run:
    """An in-process SecAgg round: devices, the server, and what each device fed in."""

    setup: RoundSetup
    devices: dict[str, SecAggDevice]
    server: SecAggServer
    q: dict[str, np.ndarray] = field(default_factory=dict)
    seen_masked: dict[str, np.ndarray] = field(default_factory=dict)

    def expected(self, included: Collection[str]) -> np.ndarray:
        total = np.zeros(DIM, dtype=np.uint64)
        for d in included:
            total += self.q[d]
        return total & self.setup.mask


def start(setup: RoundSetup, seed: int = 0, scale: float = 0.3) -> Run:
    rng = np.random.default_rng(seed)
    run = Run(setup, {d: SecAggDevice(setup, d) for d in setup.cohort}, SecAggServer(setup, DIM))
    for d in setup.cohort:
        run.q[d] = quantise(rng.normal(0, scale, DIM), setup.config)
    return run


def to_masking(run: Run, drop_advertise: Collection[str] = ()) -> dict[str, SharesRelay]:
    for d, dev in run.devices.items():
        if d not in drop_advertise:
            run.server.receive_advertise(wire(dev.advertise()))  # type: ignore[arg-type]
    for d, msg in run.server.close_advertise().items():
        run.server.receive_shares(wire(run.devices[d].share_keys(wire(msg))))  # type: ignore[arg-type]
    return run.server.close_shares()


def to_unmask(
    run: Run, relays: dict[str, SharesRelay], drop_before_input: Collection[str] = ()
) -> dict[str, UnmaskRequest]:
    for d, relay in relays.items():
        if d in drop_before_input:
            continue
        masked = wire(run.devices[d].masked_input(wire(relay), run.q[d]))  # type: ignore[arg-type]
        assert isinstance(masked, MaskedInput)
        run.seen_masked[d] = masked.values()
        run.server.receive_masked(masked)
    return run.server.close_masked()


def finish(run: Run, requests: dict[str, UnmaskRequest], drop_during_unmask: Collection[str] = ()) -> SecAggResult:
    for d, req in requests.items():
        if d not in drop_during_unmask:
            run.server.receive_unmask(wire(run.devices[d].unmask(wire(req))))  # type: ignore[arg-type]
    return run.server.finish()


def full_round(
    setup: RoundSetup, before: Collection[str] = (), during: Collection[str] = ()
) -> tuple[Run, SecAggResult]:
    run = start(setup)
    result = finish(run, to_unmask(run, to_masking(run), before), during)
    return run, result


def test_ten_devices_all_survive_sum_is_exact() -> None:
    setup = RoundSetup("round-1", ids(10), b"public-seed", SecAggConfig())
    assert (setup.degree, setup.threshold) == (8, 5)
    run, result = full_round(setup)
    assert result.included == setup.cohort and result.dropped_before_input == ()
    assert np.array_equal(result.total, run.expected(setup.cohort))
    # the hub's float sum is the sum of the quantised updates, within one step per device
    plain = sum(dequantise(run.q[d], setup.config) for d in setup.cohort)
    assert np.allclose(dequantise(result.total, setup.config), plain, atol=1e-9)


@pytest.mark.parametrize(("n", "degree", "threshold"), [(10, 9, 5), (24, 8, 5)])
def test_dropouts_above_threshold_sum_covers_exactly_the_masked_inputs(n: int, degree: int, threshold: int) -> None:
    setup = RoundSetup("round-2", ids(n), b"seed-2", SecAggConfig(degree=degree, threshold=threshold))
    before = set(setup.cohort[: max(3, n * 3 // 10) if n == 10 else 2])  # 30 % of 10; 2 of 24 (k = 8, t = 5)
    during = {setup.cohort[-1]}
    run, result = full_round(setup, before, during)
    assert set(result.included) == set(setup.cohort) - before
    assert set(result.dropped_before_input) == before
    assert set(result.unmask_responders) == set(setup.cohort) - before - during
    assert np.array_equal(result.total, run.expected(result.included))
    assert not np.array_equal(result.total, run.expected(setup.cohort))


def test_below_threshold_fails_cleanly_and_the_next_round_works() -> None:
    setup = RoundSetup("round-3", ids(10), b"seed-3", SecAggConfig(degree=9, threshold=5))
    before, during = set(setup.cohort[:5]), set(setup.cohort[5:6])
    run = start(setup)
    requests = to_unmask(run, to_masking(run), before)  # 5 masked inputs: still t
    with pytest.raises(SecAggError) as err:
        finish(run, requests, during)  # 4 answer the unmask request < t
    assert err.value.reason is SecAggFailure.BELOW_THRESHOLD
    assert run.server.stage == "failed"

    run = start(setup)
    with pytest.raises(SecAggError) as err:
        to_masking(run, drop_advertise=setup.cohort[:6])
    assert err.value.reason is SecAggFailure.BELOW_THRESHOLD

    # enough devices overall, but too few of one device's neighbours answer to rebuild its seed
    sparse = RoundSetup("round-3b", ids(24), b"seed-3b", SecAggConfig(degree=8, threshold=5))
    victim = sparse.cohort[0]
    run = start(sparse)
    requests = to_unmask(run, to_masking(run))
    with pytest.raises(SecAggError) as err:
        finish(run, requests, sparse.graph[victim][:4])
    assert err.value.reason is SecAggFailure.BELOW_THRESHOLD and victim in err.value.detail

    nxt = replace(setup, round_id="round-4")
    run, result = full_round(nxt, before=setup.cohort[:2])
    assert np.array_equal(result.total, run.expected(result.included))


def test_device_aborts_when_asked_for_both_shares_of_one_peer() -> None:
    setup = RoundSetup("round-5", ids(6), b"seed-5", SecAggConfig(degree=5, threshold=3))
    run = start(setup)
    requests = to_unmask(run, to_masking(run), before := {setup.cohort[0]})
    victim, honest = setup.cohort[0], requests[setup.cohort[1]]
    assert victim in honest.dropped
    greedy = replace(honest, survivors=(*honest.survivors, victim))
    dev = run.devices[setup.cohort[1]]
    with pytest.raises(SecAggError) as err:
        dev.unmask(greedy)
    assert err.value.reason is SecAggFailure.PROTOCOL_VIOLATION
    with pytest.raises(SecAggError) as err:
        dev.unmask(honest)  # an aborted device reveals nothing afterwards
    assert err.value.reason is SecAggFailure.ABORTED

    # the same attack split over two requests: the first is answered, the second one aborts
    other = run.devices[setup.cohort[2]]
    req = requests[setup.cohort[2]]
    first = other.unmask(req)
    assert {s.peer for s in first.key_shares} == before and all(s.peer != victim for s in first.seed_shares)
    with pytest.raises(SecAggError):
        other.unmask(replace(req, survivors=(victim,), dropped=()))


def test_tampered_swapped_or_replayed_share_ciphertexts_are_rejected_as_their_sender_dropping_out() -> None:
    setup = RoundSetup("round-6", ids(5), b"seed-6", SecAggConfig(degree=4, threshold=3))
    run = start(setup)
    relays = to_masking(run)
    target = setup.cohort[0]
    relay = relays[target]
    dev = run.devices[target]
    first, second = relay.shares[0], relay.shares[1]
    own = run.server.shares[target].shares

    flipped = bytearray(first.ciphertext)
    flipped[20] ^= 1
    cases = {
        "tampered": Sealed(first.peer, bytes(flipped)),
        "swapped sender": Sealed(first.peer, second.ciphertext),
        # what the target itself sealed for that peer, reflected back to it: same pair key, only the AD differs
        "reflected": Sealed(first.peer, next(s.ciphertext for s in own if s.peer == first.peer)),
    }
    # a ciphertext sealed for the same pair in another round (replayed into this round's relay)
    other = RoundSetup("round-7", setup.cohort, setup.seed, setup.config)
    old = to_masking(start(other))[target]
    cases["other round"] = next(s for s in old.shares if s.peer == first.peer)
    for name, bad in cases.items():  # none of them authenticates
        with pytest.raises(SecAggError) as err:
            dev._open(bad)
        assert err.value.reason is SecAggFailure.BAD_CIPHERTEXT, name

    # whole messages of another round: rejected by device and server
    with pytest.raises(SecAggError) as err:
        dev.masked_input(replace(relay, round_id="round-7"), run.q[target])
    assert err.value.reason is SecAggFailure.WRONG_ROUND
    other_dev = SecAggDevice(other, target)
    with pytest.raises(SecAggError) as err:
        run.server.receive_advertise(other_dev.advertise())
    assert err.value.reason is SecAggFailure.WRONG_ROUND

    # a relay with one bad bundle: its sender is left out of the masks and named, not a reason to abort
    masked = dev.masked_input(replace(relay, shares=(cases["tampered"], *relay.shares[1:])), run.q[target])
    assert masked.rejected == (first.peer,)
    run.server.receive_masked(masked)
    with pytest.raises(SecAggError) as err:
        run.server.receive_masked(masked)
    assert err.value.reason is SecAggFailure.DUPLICATE


def test_masked_inputs_look_uniform_and_uncorrelated_with_the_update() -> None:
    setup = RoundSetup("round-8", ids(4), b"seed-8", SecAggConfig(degree=3, threshold=2))
    run = start(setup)
    dim_run = Run(setup, run.devices, SecAggServer(setup, 1 << 15))
    ramp = np.linspace(-0.5, 0.5, 1 << 15)  # a very non-uniform update
    dim_run.q = {d: quantise(ramp, setup.config) for d in setup.cohort}
    relays = to_masking(dim_run)
    for d in setup.cohort:
        y = dim_run.devices[d].masked_input(relays[d], dim_run.q[d]).values()
        counts = np.bincount(y.astype("<u4").view(np.uint8), minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-6, d
        assert stats.kstest(y / 2.0**32, "uniform").pvalue > 1e-6, d
        r = np.corrcoef(y.astype(np.float64), dequantise(dim_run.q[d], setup.config))[0, 1]
        assert abs(r) < 6 / np.sqrt(y.size), d
    # and the same tests do see the unmasked quantised update
    counts = np.bincount(dim_run.q[setup.cohort[0]].astype("<u4").view(np.uint8), minlength=256)
    assert stats.chisquare(counts).pvalue < 1e-6


@settings(max_examples=25, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.integers(1, 6), st.integers(0, 6), st.randoms(use_true_random=False))
def test_shamir_any_threshold_subset_recovers_the_secret(secret: bytes, t: int, extra: int, rnd: object) -> None:
    shares = split_secret(secret, t, t + extra)
    assert [i for i, _ in shares] == list(range(1, t + extra + 1))
    subset = rnd.sample(shares, t)  # type: ignore[attr-defined]
    assert combine_secret(subset) == secret
    if t > 1:
        assert combine_secret(subset[:-1]) != secret


def _probably_prime(n: int) -> bool:
    """Miller-Rabin with the first 40 primes as bases (a composite passes with probability < 4^-40)."""
    bases = [b for b in range(2, 180) if all(b % d for d in range(2, b))][:40]
    if n < 2 or any(n % b == 0 for b in bases):
        return n in bases
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def test_shamir_field_is_the_least_prime_above_2_256() -> None:
    assert SHAMIR_PRIME == 2**256 + 297 and _probably_prime(SHAMIR_PRIME)
    assert not any(_probably_prime(2**256 + k) for k in range(1, 297))
    assert SHARE_BYTES == (SHAMIR_PRIME.bit_length() + 7) // 8 == 33  # any field element, fixed width


def _el(v: int) -> bytes:
    return v.to_bytes(SHARE_BYTES, "big")


def test_shamir_known_vectors_by_hand() -> None:
    """Cost (no timing asserted): split is Horner, count * threshold multiplications mod p; combine is
    Lagrange at 0, ~2 t^2 multiplications and t modular inverses on 257-bit ints, microseconds per secret."""
    # f(x) = 5 + 2x + 3x^2: f(1) = 10, f(2) = 21, f(3) = 38, f(4) = 61
    shares = _split_with(5, [2, 3], 4)
    assert shares == [(1, _el(10)), (2, _el(21)), (3, _el(38)), (4, _el(61))]
    for subset in ([0, 1, 2], [1, 2, 3], [3, 0, 2], [0, 1, 3]):
        assert combine_secret([shares[i] for i in subset]) == (5).to_bytes(32, "big")
    # reduction mod p: f(x) = (2^256 - 1) + 300x wraps at x = 1 to 2^256 + 299 - p = 2
    top = 2**256 - 1
    wrapped = _split_with(top, [300], 2)
    assert wrapped == [(1, _el(2)), (2, _el(302))]
    assert combine_secret(wrapped) == top.to_bytes(32, "big")
    assert combine_secret([(2, _el(302)), (1, _el(2))]) == bytes([255] * 32)  # order does not matter
    # a degree-0 polynomial: every share is the secret, left-padded to the field width
    secret = bytes(range(32))
    assert split_secret(secret, 1, 3) == [(i, b"\x00" + secret) for i in (1, 2, 3)]
    # linearity: share-wise sums mod p are shares of the sum
    a, b = bytes([7] * 32), bytes(range(100, 132))
    sa, sb = split_secret(a, 3, 5), split_secret(b, 3, 5)
    added = [
        (i, _el((int.from_bytes(u, "big") + int.from_bytes(v, "big")) % SHAMIR_PRIME))
        for (i, u), (_, v) in zip(sa, sb, strict=True)
    ]
    assert combine_secret(added[1:4]) == (int.from_bytes(a, "big") + int.from_bytes(b, "big")).to_bytes(32, "big")


def test_shamir_rejects_malformed_shares() -> None:
    good = _split_with(5, [2, 3], 3)
    cases = {
        "repeated index": [good[0], good[0], good[1]],
        "index 0": [(0, _el(5)), good[1], good[2]],
        "value p": [good[0], good[1], (3, _el(SHAMIR_PRIME))],
        "32-byte share": [good[0], good[1], (3, (38).to_bytes(32, "big"))],
        "34-byte share": [good[0], good[1], (3, (38).to_bytes(34, "big"))],
        "no shares": [],
        "secret >= 2^256": [(1, _el(2**256)), (2, _el(2**256))],  # consistent shares of no 32-byte secret
    }
    for name, shares in cases.items():
        with pytest.raises(SecAggError) as err:
            combine_secret(shares)
        assert err.value.reason is SecAggFailure.MALFORMED, name
    with pytest.raises(ValueError):
        split_secret(bytes(32), 4, 3)


def test_shamir_fewer_than_threshold_shares_do_not_reveal_the_secret() -> None:
    secret = bytes(range(32))
    guesses = [combine_secret(split_secret(secret, 3, 5)[:2]) for _ in range(200)]
    assert secret not in guesses and len(set(guesses)) == 200  # t - 1 shares interpolate to fresh noise
    # one share of a t = 2 sharing is uniform mod p: its top byte is 0 or 1, its next byte looks uniform
    seconds = [split_secret(secret, 2, 2)[0][1][1] for _ in range(2000)]
    assert stats.chisquare(np.bincount(seconds, minlength=256)).pvalue > 1e-6


def test_server_rejects_revealed_shares_of_the_wrong_length() -> None:
    setup = RoundSetup("round-10", ids(5), b"seed-10", SecAggConfig(degree=4, threshold=3))
    run = start(setup)
    requests = to_unmask(run, to_masking(run))
    d = setup.cohort[0]
    resp = run.devices[d].unmask(requests[d])
    assert all(len(s.share) == SHARE_BYTES for s in resp.seed_shares)
    short = replace(
        resp, seed_shares=(replace(resp.seed_shares[0], share=resp.seed_shares[0].share[1:]), *resp.seed_shares[1:])
    )
    with pytest.raises(SecAggError) as err:
        run.server.receive_unmask(wire(short))  # type: ignore[arg-type]
    assert err.value.reason is SecAggFailure.MALFORMED
    run.server.receive_unmask(resp)


@pytest.mark.parametrize("stochastic", [False, True])
def test_quantisation_round_trip_error_is_bounded_by_the_scale(stochastic: bool) -> None:
    cfg = SecAggConfig(clip=2.0, scale=1000.0, stochastic=stochastic)
    x = np.random.default_rng(1).uniform(-3, 3, 4000)
    back = dequantise(quantise(x, cfg, np.random.default_rng(2)), cfg)
    err = np.abs(back - np.clip(x, -2, 2))
    assert err.max() <= (1.0 if stochastic else 0.5) / cfg.scale + 1e-12
    assert np.abs(back).max() <= 2.0
    # a negative sum of many devices is centred back correctly
    total = np.zeros(3, dtype=np.uint64)
    for _ in range(7):
        total += quantise(np.full(3, -1.5), cfg, np.random.default_rng(3))
    assert np.allclose(dequantise(total, cfg), -10.5)


def test_cohort_that_could_overflow_the_ring_is_refused() -> None:
    cfg = SecAggConfig(clip=1.0, scale=2.0**20)  # max |q| 2^20: at most 2^11 - 1 devices in 2^32
    RoundSetup("ok", ids(2047), b"s", cfg)
    with pytest.raises(ConfigError) as err:
        RoundSetup("too-many", ids(2048), b"s", cfg)
    assert err.value.field == "secagg.scale"
    with pytest.raises(ConfigError):
        RoundSetup("t-too-low", ids(10), b"s", SecAggConfig(degree=8, threshold=4))


def test_graph_is_public_deterministic_regular_and_symmetric() -> None:
    cohort = ids(100)
    g = neighbour_graph(cohort, 14, b"round seed")
    assert g == neighbour_graph(tuple(reversed(cohort)), 14, b"round seed")
    assert g != neighbour_graph(cohort, 14, b"another seed")
    assert all(len(p) == 14 and d not in p for d, p in g.items())
    assert all(d in g[p] for d, peers in g.items() for p in peers)
    assert RoundSetup("r", cohort, b"x").degree == 14  # 2 * ceil(log2 100)


def test_wire_encoding_rejects_malformed_payloads() -> None:
    msg = UnmaskRequest("r", HUB, "dev-001", ("dev-002",), ("dev-003",))
    raw = encode(msg)
    assert decode(raw) == msg
    for bad in (raw[:-1], raw + b"\x00", b"XYZ" + raw[3:], raw[:4] + b"\x63" + raw[5:]):
        with pytest.raises(SecAggError) as err:
            decode(bad)
        assert err.value.reason is SecAggFailure.MALFORMED


def test_server_rejects_strangers_stage_errors_and_one_sided_sharing() -> None:
    setup = RoundSetup("round-9", ids(8), b"seed-9", SecAggConfig(degree=4, threshold=3))
    run = start(setup)
    outsider = SecAggDevice(RoundSetup("round-9", (*ids(8), "intruder"), b"seed-9", setup.config), "intruder")
    with pytest.raises(SecAggError) as err:
        run.server.receive_advertise(outsider.advertise())
    assert err.value.reason is SecAggFailure.UNKNOWN_SENDER
    adverts = {d: dev.advertise() for d, dev in run.devices.items()}
    for msg in adverts.values():
        run.server.receive_advertise(msg)
    with pytest.raises(SecAggError) as err:
        run.server.receive_advertise(adverts[setup.cohort[0]])
    assert err.value.reason is SecAggFailure.DUPLICATE
    broadcasts = run.server.close_advertise()
    with pytest.raises(SecAggError) as err:
        run.server.receive_advertise(adverts[setup.cohort[0]])
    assert err.value.reason is SecAggFailure.OUT_OF_ORDER
    d = setup.cohort[0]
    shares = run.devices[d].share_keys(broadcasts[d])
    with pytest.raises(SecAggError) as err:  # a device sharing to only some neighbours would unbalance masks
        run.server.receive_shares(replace(shares, shares=shares.shares[1:]))
    assert err.value.reason is SecAggFailure.PROTOCOL_VIOLATION
    run.server.receive_shares(shares)
