"""SecAgg+ stage messages and their explicit byte encodings (inside ``secagg`` frames: PROTOCOL.md §9).

Every message carries the round id and its sender; hub-to-device messages also name the receiver.
Encoding (no pickle): ``b"FSA" | version u8 | kind u8`` then the fields in declaration order:
strings as ``u16 length | UTF-8``, byte strings as ``u32 length | bytes``, integers as ``u32``, tuples as
``u32 count | items``. Every length is big-endian; a truncated payload or trailing bytes are ``malformed``.
A message's last ``OPTIONAL`` fields (``MaskedInput.rejected``) are written only when not empty: without them the
bytes are those of version 1 before the field existed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from fedge.protocol.errors import SecAggError, SecAggFailure

HUB = "hub"  # the sender name of hub-to-device stage messages
_MAGIC = b"FSA"
_VERSION = 1


@dataclass(frozen=True)
class PeerKeys:
    """A neighbour's two advertised X25519 public keys (encryption c, masking s)."""

    peer: str
    enc_pk: bytes
    mask_pk: bytes
    SCHEMA: ClassVar[str] = "sbb"


@dataclass(frozen=True)
class Sealed:
    """An encrypted share bundle; ``peer`` is its receiver in `ShareKeys`, its sender in `SharesRelay`."""

    peer: str
    ciphertext: bytes
    SCHEMA: ClassVar[str] = "sb"


@dataclass(frozen=True)
class RevealedShare:
    """One Shamir share of ``peer``'s secret: an index and a 33-byte big-endian element of GF(2^256 + 297)."""

    peer: str
    index: int
    share: bytes
    SCHEMA: ClassVar[str] = "sib"


@dataclass(frozen=True)
class AdvertiseKeys:
    """Stage 0, device → hub: the device's public keys and a commitment to its self-mask seed."""

    round_id: str
    sender: str
    enc_pk: bytes
    mask_pk: bytes
    seed_commit: bytes
    KIND: ClassVar[int] = 1
    SCHEMA: ClassVar[str] = "ssbbb"


@dataclass(frozen=True)
class KeysBroadcast:
    """Stage 1, hub → device: the keys of the receiver's neighbours that advertised."""

    round_id: str
    sender: str
    receiver: str
    peers: tuple[PeerKeys, ...]
    KIND: ClassVar[int] = 2
    SCHEMA: ClassVar[str] = "sssP"


@dataclass(frozen=True)
class ShareKeys:
    """Stage 1, device → hub: one AES-GCM sealed share bundle per neighbour."""

    round_id: str
    sender: str
    shares: tuple[Sealed, ...]
    KIND: ClassVar[int] = 3
    SCHEMA: ClassVar[str] = "ssC"


@dataclass(frozen=True)
class SharesRelay:
    """Stage 2, hub → device: the sealed bundles addressed to the receiver (the hub cannot open them)."""

    round_id: str
    sender: str
    receiver: str
    shares: tuple[Sealed, ...]
    KIND: ClassVar[int] = 4
    SCHEMA: ClassVar[str] = "sssC"


@dataclass(frozen=True)
class MaskedInput:
    """Stage 2, device → hub: the masked quantised update, little-endian u32 (u64 above 32 ring bits)."""

    round_id: str
    sender: str
    ring_bits: int
    vector: bytes
    rejected: tuple[str, ...] = ()  # neighbours whose relayed share bundle would not open: left out of the masks
    KIND: ClassVar[int] = 5
    SCHEMA: ClassVar[str] = "ssibS"
    OPTIONAL: ClassVar[int] = 1

    def values(self) -> NDArray[np.uint64]:
        """The vector as ring elements (``uint64``)."""
        width = ring_width(self.ring_bits)
        if len(self.vector) % width:
            raise SecAggError(SecAggFailure.MALFORMED, f"masked vector of {len(self.vector)} bytes")
        return np.frombuffer(self.vector, dtype=f"<u{width}").astype(np.uint64)


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 3, hub → device: for each neighbour, reveal the seed share (survivor) or key share (dropped)."""

    round_id: str
    sender: str
    receiver: str
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    KIND: ClassVar[int] = 6
    SCHEMA: ClassVar[str] = "sssSS"


@dataclass(frozen=True)
class UnmaskResponse:
    """Stage 3, device → hub: seed shares of surviving neighbours, key shares of dropped ones."""

    round_id: str
    sender: str
    seed_shares: tuple[RevealedShare, ...]
    key_shares: tuple[RevealedShare, ...]
    KIND: ClassVar[int] = 7
    SCHEMA: ClassVar[str] = "ssRR"


StageMessage = AdvertiseKeys | KeysBroadcast | ShareKeys | SharesRelay | MaskedInput | UnmaskRequest | UnmaskResponse
_KINDS: dict[int, type[Any]] = {
    c.KIND: c
    for c in (AdvertiseKeys, KeysBroadcast, ShareKeys, SharesRelay, MaskedInput, UnmaskRequest, UnmaskResponse)
}
_NESTED: dict[str, type[Any]] = {"P": PeerKeys, "C": Sealed, "R": RevealedShare}


_MIN_ITEM_BYTES: dict[str, int] = {"S": 2, "P": 2 + 4 + 4, "C": 2 + 4, "R": 2 + 4 + 4}
"""The fewest bytes one item of a tuple field can take (its empty strings and byte strings)."""


def ring_width(ring_bits: int) -> int:
    """Bytes per ring element on the wire: 4 up to 32 bits, else 8."""
    return 4 if ring_bits <= 32 else 8


def _put(out: list[bytes], code: str, value: Any) -> None:
    if code == "s":
        raw = value.encode()
        out += [struct.pack(">H", len(raw)), raw]
    elif code == "b":
        out += [struct.pack(">I", len(value)), bytes(value)]
    elif code == "i":
        out.append(struct.pack(">I", value))
    else:
        out.append(struct.pack(">I", len(value)))
        for item in value:
            if code == "S":
                _put(out, "s", item)
            else:
                for f, c in zip(fields(item), item.SCHEMA, strict=True):
                    _put(out, c, getattr(item, f.name))


def _required(cls: type[Any]) -> int:
    return len(cls.SCHEMA) - int(getattr(cls, "OPTIONAL", 0))


def encode(msg: StageMessage) -> bytes:
    """The explicit byte encoding of a stage message (optional trailing fields only when not empty)."""
    out = [_MAGIC, bytes([_VERSION, msg.KIND])]
    values = [getattr(msg, f.name) for f in fields(msg)]
    keep = len(values)
    while keep > _required(type(msg)) and not values[keep - 1]:
        keep -= 1
    for value, code in zip(values[:keep], msg.SCHEMA[:keep], strict=True):
        _put(out, code, value)
    return b"".join(out)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise SecAggError(SecAggFailure.MALFORMED, "truncated payload")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u(self, fmt: str) -> int:
        value: int = struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]
        return value

    def get(self, code: str) -> Any:
        if code == "s":
            try:
                return self.take(self.u(">H")).decode()
            except UnicodeDecodeError as exc:
                raise SecAggError(SecAggFailure.MALFORMED, "a string is not UTF-8") from exc
        if code == "b":
            return self.take(self.u(">I"))
        if code == "i":
            return self.u(">I")
        count = self.u(">I")
        if count * _MIN_ITEM_BYTES[code] > len(self.data) - self.pos:  # every item takes at least this many bytes
            raise SecAggError(SecAggFailure.MALFORMED, f"count {count} exceeds the payload")
        if code == "S":
            return tuple(self.get("s") for _ in range(count))
        cls = _NESTED[code]
        return tuple(cls(*(self.get(c) for c in cls.SCHEMA)) for _ in range(count))


def decode(payload: bytes) -> StageMessage:
    """Decode a stage message; raises `SecAggError` (``malformed``) on any structural problem."""
    if len(payload) < 5 or payload[:3] != _MAGIC or payload[3] != _VERSION:
        raise SecAggError(SecAggFailure.MALFORMED, "not a SecAgg stage message of version 1")
    cls = _KINDS.get(payload[4])
    if cls is None:
        raise SecAggError(SecAggFailure.MALFORMED, f"unknown kind {payload[4]}")
    reader = _Reader(payload)
    reader.pos = 5
    values = [reader.get(code) for code in cls.SCHEMA[:_required(cls)]]
    for code in cls.SCHEMA[_required(cls):]:  # optional trailing fields: present only when not empty
        if reader.pos == len(payload):
            break
        values.append(reader.get(code))
    if reader.pos != len(payload):
        raise SecAggError(SecAggFailure.MALFORMED, f"{len(payload) - reader.pos} trailing bytes")
    msg: StageMessage = cls(*values)
    return msg
