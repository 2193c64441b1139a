"""SecAgg drops the bad sender instead of the round (issue 21, item 4): garbage share bundles make their sender drop
out, bad revealed shares are outvoted by the others, and the device responsible is named."""

from __future__ import annotations

import os
import secrets
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.core.secagg import (
    SHAMIR_PRIME,
    SHARE_BYTES,
    RoundSetup,
    SecAggConfig,
    robust_secret,
    seed_commitment,
    split_secret,
)
from fedge.protocol.errors import SecAggError, SecAggFailure
from fedge.protocol.secagg_wire import MaskedInput, RevealedShare, Sealed, ShareKeys, UnmaskResponse
from tests.secagg.test_secagg import Run, ids, start, wire


def _garbage(msg: ShareKeys) -> ShareKeys:
    return replace(msg, shares=tuple(Sealed(s.peer, os.urandom(len(s.ciphertext))) for s in msg.shares))


def _junk(resp: UnmaskResponse) -> UnmaskResponse:
    def j(s: RevealedShare) -> RevealedShare:
        return RevealedShare(s.peer, s.index, secrets.randbelow(SHAMIR_PRIME).to_bytes(SHARE_BYTES, "big"))

    return replace(resp, seed_shares=tuple(j(s) for s in resp.seed_shares),
                   key_shares=tuple(j(s) for s in resp.key_shares))


def _round(run: Run, *, garbage_from: str | None = None, junk_from: str | None = None) -> object:
    """One round through every stage encoding; ``garbage_from`` seals random bytes, ``junk_from`` reveals random
    shares."""
    server = run.server
    for dev in run.devices.values():
        server.receive_advertise(wire(dev.advertise()))  # type: ignore[arg-type]
    for d, msg in server.close_advertise().items():
        shares = run.devices[d].share_keys(wire(msg))  # type: ignore[arg-type]
        server.receive_shares(wire(_garbage(shares) if d == garbage_from else shares))  # type: ignore[arg-type]
    for d, relay in server.close_shares().items():
        masked = wire(run.devices[d].masked_input(wire(relay), run.q[d]))  # type: ignore[arg-type]
        assert isinstance(masked, MaskedInput)
        server.receive_masked(masked)
    for d, req in server.close_masked().items():
        resp = run.devices[d].unmask(wire(req))  # type: ignore[arg-type]
        server.receive_unmask(wire(_junk(resp) if d == junk_from else resp))  # type: ignore[arg-type]
    return server.finish()


@pytest.mark.parametrize(("n", "degree"), [(5, 4), (9, 4)])
def test_garbage_share_bundles_drop_their_sender_not_the_round(n: int, degree: int) -> None:
    setup = RoundSetup("round-g", ids(n), b"seed-g", SecAggConfig(degree=degree, threshold=3))
    run = start(setup)
    bad = setup.cohort[1]
    result = _round(run, garbage_from=bad)
    others = tuple(d for d in setup.cohort if d != bad)
    assert result.included == others  # type: ignore[attr-defined]
    assert np.array_equal(result.total, run.expected(others))  # type: ignore[attr-defined]
    blamed = dict(result.blamed)  # type: ignore[attr-defined]
    assert set(blamed) == {bad} and "did not open" in blamed[bad]


def test_garbage_revealed_shares_are_outvoted_and_their_responder_named() -> None:
    setup = RoundSetup("round-u", ids(6), b"seed-u", SecAggConfig(degree=5, threshold=3))
    run = start(setup)
    liar = setup.cohort[2]
    result = _round(run, junk_from=liar)
    assert result.included == setup.cohort  # type: ignore[attr-defined]
    assert np.array_equal(result.total, run.expected(setup.cohort))  # type: ignore[attr-defined]
    assert [d for d, _ in result.blamed] == [liar]  # type: ignore[attr-defined]


def test_an_accuser_nobody_else_backs_is_named() -> None:
    setup = RoundSetup("round-a", ids(6), b"seed-a", SecAggConfig(degree=5, threshold=3))
    run = start(setup)
    server = run.server
    for dev in run.devices.values():
        server.receive_advertise(wire(dev.advertise()))  # type: ignore[arg-type]
    for d, msg in server.close_advertise().items():
        server.receive_shares(wire(run.devices[d].share_keys(wire(msg))))  # type: ignore[arg-type]
    liar = setup.cohort[0]
    victims = setup.cohort[1:3]
    for d, relay in server.close_shares().items():
        if d == liar:  # it opens every bundle but says two did not: they are dropped for this round, it is named
            relay = replace(relay, shares=tuple(s if s.peer not in victims else Sealed(s.peer, b"x" * 60)
                                                for s in relay.shares))
        server.receive_masked(wire(run.devices[d].masked_input(wire(relay), run.q[d])))  # type: ignore[arg-type]
    for d, req in server.close_masked().items():
        server.receive_unmask(wire(run.devices[d].unmask(wire(req))))  # type: ignore[arg-type]
    result = server.finish()
    rest = tuple(d for d in setup.cohort if d not in victims)
    assert result.included == rest and np.array_equal(result.total, run.expected(rest))
    assert dict(result.blamed).keys() == {liar}


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.integers(0, 3), st.data())
def test_robust_secret_finds_the_secret_and_every_bad_share(t: int, extra: int, data: st.DataObject) -> None:
    secret = secrets.token_bytes(32)
    n = t + extra + data.draw(st.integers(0, 2))
    shares = [(f"r{i}", i, v) for i, v in split_secret(secret, t, n)]
    # at most (n - t) // 2 bad shares: always recoverable by leaving them out
    bad = data.draw(st.sets(st.integers(0, n - 1), max_size=(n - t) // 2))
    for b in bad:
        r, i, _ = shares[b]
        shares[b] = (r, i, secrets.randbelow(SHAMIR_PRIME).to_bytes(SHARE_BYTES, "big"))
    commit = seed_commitment("rid", "owner", secret)
    got, blamed = robust_secret(shares, t, lambda s: seed_commitment("rid", "owner", s) == commit)
    assert got == secret and blamed == sorted(shares[b][0] for b in bad)


def test_a_bad_share_claiming_an_honest_shares_index_is_blamed() -> None:
    """A responder may put any index on its share: garbage under the index of an honest share that helps define
    the polynomial must still be checked, and blamed (review finding: only indices outside the chosen ones were)."""
    secret = secrets.token_bytes(32)
    shares = [(f"r{i}", i, v) for i, v in split_secret(secret, 3, 6)]
    shares.append(("r0a", 1, secrets.randbelow(SHAMIR_PRIME).to_bytes(SHARE_BYTES, "big")))
    commit = seed_commitment("rid", "owner", secret)
    got, blamed = robust_secret(shares, 3, lambda s: seed_commitment("rid", "owner", s) == commit)
    assert got == secret and blamed == ["r0a"]


def test_robust_secret_gives_up_with_a_reason() -> None:
    secret = secrets.token_bytes(32)
    shares = [(f"r{i}", i, os.urandom(SHARE_BYTES)) for i, _ in split_secret(secret, 3, 4)]
    with pytest.raises(SecAggError) as err:
        robust_secret(shares, 3, lambda s: s == secret)
    assert err.value.reason is SecAggFailure.BAD_SHARE
