"""The ``chain_rounds`` chain and an operator's queued start, kept in the hub store's meta (they survive a restart)."""

from __future__ import annotations

from dataclasses import replace

from fedge.core.rounds import over_limits
from fedge.hub.port import HubPort
from fedge.protocol.codec import decode_control, encode_control
from fedge.protocol.messages import RoundOverrides

__all__ = ["RoundChain"]


class RoundChain:
    """How many rounds of a chain are left (``chain_left``) with which overrides, and the start queued behind a
    deploy gate's evaluation round; the round runner opens them (``continue_chain``)."""

    def __init__(self, hub: HubPort) -> None:
        self.hub = hub
        store = hub.store
        self._chain_left = int(store.get_meta("chain_left") or 0)
        self._chain_overrides = decode_control((store.get_meta("chain_overrides") or "").encode())
        if self._chain_left and over_limits(self._chain_overrides, hub.cfg.limits):  # limits lowered: chain ends
            self._chain_left = 0

    def set_chain(self, left: int, overrides: RoundOverrides) -> None:
        overrides = replace(overrides, request_id=None)  # a reply goes to the request's own round only
        self._chain_left, self._chain_overrides = left, overrides
        self.hub.store.set_meta("chain_left", str(left))
        self.hub.store.set_meta("chain_overrides", encode_control(overrides).decode())

    def end_chain(self) -> None:
        self.set_chain(0, RoundOverrides())

    def queue(self, overrides: RoundOverrides) -> None:
        """An operator's start that arrived while a deploy gate's evaluation round was open: it opens next (before
        what is left of a chain, which it replaces as any operator start does)."""
        self.hub.store.set_meta("queued_start", encode_control(overrides).decode())

    def queued(self) -> bool:
        return bool(self.hub.store.get_meta("queued_start"))

    def drop_queued(self) -> None:
        self.hub.store.set_meta("queued_start", "")
