"""The operator's client: ask a hub for rounds over MQTT and follow their results (PROTOCOL.md §5).

One client for ``fedge round start|select|cancel`` and the demo: it subscribes to ``control/round/reply`` and
``round/result`` *before* publishing a request with a fresh ``request_id``, waits for the reply to that id, and can
then wait for a round's result. Works on any :class:`~fedge.protocol.transport.Transport`.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedge.protocol.codec import decode, encode_control
from fedge.protocol.control import CancelRequest, encode_cancel
from fedge.protocol.errors import ConfigError, FedgeError
from fedge.protocol.messages import RoundOverrides, RoundResult
from fedge.protocol.mqtt_config import BrokerConfig
from fedge.protocol.selection import SelectRequest, encode_select_control
from fedge.protocol.topics import Topics
from fedge.protocol.transport import Transport

__all__ = ["Operator", "add_broker_args", "control_broker", "new_request_id"]


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def add_broker_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--broker", help="mqtt://host:port (no login, no TLS options)")
    g.add_argument("--broker-config", metavar="FILE",
                   help="a TOML file with a [broker] table (url, username, password, ca_file, ...; paths relative to "
                        "the file), e.g. the operator.toml of fedge fleet init")


def control_broker(args: argparse.Namespace) -> BrokerConfig:
    """The BrokerConfig of a control command: ``--broker URL`` or the ``[broker]`` table of ``--broker-config``."""
    from fedge.protocol.tomlfile import read_toml

    path = getattr(args, "broker_config", None)
    if path is None:
        return BrokerConfig(url=args.broker)
    table = read_toml(path, "broker_config").get("broker")
    if not isinstance(table, dict):
        raise ConfigError("broker", f"{path} has no [broker] table")
    base = Path(path).resolve().parent
    files = {k: str(base / v) for k in ("ca_file", "cert_file", "key_file") if isinstance(v := table.get(k), str)}
    return BrokerConfig.from_mapping({**table, **files})


class Operator:
    """Requests to one fleet's hub and the results it publishes, over ``transport`` (subscribed at once; connect
    the transport afterwards). ``on_result`` is called for every result seen (retained ones included), the
    operators' full copy (``control/round/result``) in preference to the one devices read."""

    def __init__(self, transport: Transport, fleet: str, on_result: Callable[[RoundResult], None] | None = None
                 ) -> None:
        self.transport = transport
        self.fleet = fleet
        self.topics = Topics(fleet)  # an invalid fleet id is a ConfigError before connecting
        self._on_result = on_result
        self._replies: dict[str, dict[str, Any]] = {}
        self._results: dict[int, RoundResult] = {}
        self._full: set[int] = set()  # rounds whose operator copy arrived
        self._cond = threading.Condition()
        transport.subscribe(self.topics.control_round_reply, self._reply)
        transport.subscribe(self.topics.result, self._result)
        transport.subscribe(self.topics.control_round_result, self._result)  # the full result (cohort, samples)

    def _reply(self, _topic: str, payload: bytes) -> None:
        try:
            body = json.loads(payload)
        except ValueError:
            return
        if isinstance(body, dict) and isinstance(body.get("request_id"), str):
            with self._cond:
                self._replies[body["request_id"]] = body
                self._cond.notify_all()

    def _result(self, topic: str, payload: bytes) -> None:
        try:
            msg = decode(payload) if payload else None
        except FedgeError:
            return
        if isinstance(msg, RoundResult) and msg.fleet == self.fleet:
            with self._cond:
                full = topic == self.topics.control_round_result
                kept = full or msg.round not in self._full  # the device copy never replaces the operator's
                if kept:
                    self._results[msg.round] = msg
                if full:
                    self._full.add(msg.round)
                self._cond.notify_all()
            if kept and self._on_result is not None:
                self._on_result(msg)

    def _ask(self, topic: str, body: bytes, request_id: str, timeout_s: float) -> dict[str, Any]:
        self.transport.publish(topic, body)
        with self._cond:
            if not self._cond.wait_for(lambda: request_id in self._replies, timeout_s):
                raise FedgeError(f"no reply from the hub of fleet {self.fleet!r} within {timeout_s:g} s "
                                 "(is `fedge hub serve` running on this broker?)")
            reply = self._replies.pop(request_id)
        return {"fleet": self.fleet, **{k: reply.get(k) for k in ("accepted", "round", "reason", "detail")}}

    def start(self, overrides: RoundOverrides | None = None, timeout_s: float = 15.0) -> dict[str, Any]:
        """Ask for a round (and its chain): the hub's reply (``accepted``, ``round``, ``reason``, ``detail``)."""
        overrides = overrides or RoundOverrides()
        rid = overrides.request_id or new_request_id()
        return self._ask(self.topics.control_round_start, encode_control(replace(overrides, request_id=rid)), rid,
                         timeout_s)

    def select(self, candidates: tuple[str, ...], overrides: RoundOverrides | None = None,
               timeout_s: float = 15.0) -> dict[str, Any]:
        """Ask for a source-model selection round among ``candidates`` (empty: every registered one)."""
        overrides = overrides or RoundOverrides()
        rid = overrides.request_id or new_request_id()
        body = encode_select_control(SelectRequest(candidates, replace(overrides, request_id=rid)))
        return self._ask(self.topics.control_round_select, body, rid, timeout_s)

    def cancel(self, reason: str = "", round_id: int | None = None, timeout_s: float = 15.0) -> dict[str, Any]:
        """Ask the hub to cancel the open round (only ``round_id``, if given)."""
        rid = new_request_id()
        return self._ask(self.topics.control_round_cancel, encode_cancel(CancelRequest(reason, round_id, rid)), rid,
                         timeout_s)

    def result(self, round_id: int, timeout_s: float) -> RoundResult:
        """The result of round ``round_id`` (FedgeError if none arrives within ``timeout_s``)."""
        with self._cond:
            if not self._cond.wait_for(lambda: round_id in self._results, timeout_s):
                raise FedgeError(f"round {round_id}: no result within {timeout_s:g} s")
            return self._results[round_id]

    def results_after(self, round_id: int, timeout_s: float) -> list[RoundResult]:
        """Every result seen of a round after ``round_id`` (waiting up to ``timeout_s`` for at least one)."""
        t_end = time.monotonic() + timeout_s
        with self._cond:
            self._cond.wait_for(lambda: any(r > round_id for r in self._results), max(t_end - time.monotonic(), 0))
            return [self._results[r] for r in sorted(self._results) if r > round_id]

