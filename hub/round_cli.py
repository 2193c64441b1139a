"""``fedge round start|cancel`` (and the handler of ``fedge round select``): the operator's client on the command
line (:class:`~fedge.hub.operator.Operator`)."""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING, Any

from fedge.hub.operator import Operator, control_broker, new_request_id
from fedge.protocol.messages import RoundResult, RoundStatus
from fedge.protocol.topics import Topics

if TYPE_CHECKING:
    from fedge.protocol.transport_mqtt import MqttTransport

__all__ = ["run_round_cancel", "run_round_start"]


def _operator(args: argparse.Namespace) -> tuple[Operator, MqttTransport]:
    """An operator client on a fresh MQTT connection of the control command's broker."""
    from fedge.protocol.transport_mqtt import MqttTransport

    Topics(args.fleet)  # an invalid fleet id is a ConfigError before connecting
    transport = MqttTransport(control_broker(args), f"fedge-ctl-{os.getpid()}-{new_request_id()[:6]}",
                              session_expiry_s=0)
    op = Operator(transport, args.fleet)
    transport.connect()
    return op, transport


def run_round_start(args: argparse.Namespace) -> int:
    """Ask the hub for a round; print its id (and with --wait its result). Exit 0 on success, 1 when the hub
    refused or the round did not complete, 2 on usage or connection errors and when the hub does not answer."""
    from fedge.protocol.messages import RoundOverrides

    overrides = RoundOverrides(min_devices=args.min_devices, deadline_s=args.deadline_s, fraction=args.fraction,
                               local_epochs=args.local_epochs, lr=args.lr)
    op, transport = _operator(args)
    try:
        if getattr(args, "select", False):  # fedge round select: the same exchange on control/round/select
            names = tuple(c for c in (args.candidates or "").split(",") if c)
            out = op.select(names, overrides, timeout_s=args.reply_timeout)
        else:
            out = op.start(overrides, timeout_s=args.reply_timeout)
        if not out.get("accepted") or not args.wait:
            _print_start(out, args.json)
            return 0 if out.get("accepted") else 1
        rid = int(out["round"])
        if not args.json:
            print(f"round {rid} started; waiting for its result", flush=True)
        res = op.result(rid, args.timeout)
        gate = None
        if res.gate_round is not None:  # the version waits for its evaluation round: wait for the decision too
            if not args.json:
                print(f"round {rid} {res.status}: candidate {res.model_version} goes to the devices' validation "
                      f"(evaluation round {res.gate_round})", flush=True)
            gate = op.result(res.gate_round, args.timeout)
    finally:
        transport.close()
    deployed = res.deployed if gate is None else gate.model_version is not None
    result = {"fleet": args.fleet, "round": rid, "status": str(res.status), "model_version": res.model_version,
              "deployed": bool(deployed), "accuracy": res.accuracy, "loss": res.loss, "devices": list(res.devices),
              "declined": list(res.declined), "rejected": res.rejected, "seconds": round(res.seconds, 3),
              "epsilon": res.epsilon, "detail": res.detail, "federated": res.federated, "ranking": list(res.ranking)}
    if gate is not None:
        result["gate"] = {"round": gate.round, "status": str(gate.status), "deployed": bool(deployed),
                          "detail": gate.detail, "federated": gate.federated}
    if args.json:
        print(json.dumps(result))
    else:
        print(_summary(res, bool(deployed)))
        if gate is not None:
            print(f"evaluation round {gate.round} {gate.status}: {gate.detail or ''}")
            print(_federated(gate.federated))
        elif res.federated:
            print(_federated(res.federated))
    return 0 if res.status is RoundStatus.COMPLETED else 1


def _summary(res: RoundResult, deployed: bool) -> str:
    acc = "-" if res.accuracy is None else f"{res.accuracy:.4f}"
    who = (f"{len(res.devices)} devices, {len(res.declined)} declined" if res.epsilon is None
           else f"DP round (contributors withheld), epsilon {res.epsilon:.3f}")
    model = ("no new model" if res.model_version is None else
             f"model {res.model_version} deployed" if deployed else f"candidate {res.model_version} not deployed")
    return (f"round {res.round} {res.status}: {who}, {res.rejected} rejected, held-out accuracy {acc}, {model}, "
            f"{res.seconds:.2f} s" + (f" ({res.detail})" if res.detail else ""))


def _federated(federated: dict[str, float]) -> str:
    """The devices' validation scores, one line (``federated``: head -> accuracy)."""
    accs = {k[len("val_acc_"):]: v for k, v in sorted(federated.items()) if k.startswith("val_acc_")}
    if not accs:
        return "federated: no device scores (DP round, or no validation split)"
    rows = int(federated.get("val_n", 0))
    return "federated (devices' validation data, " + f"{rows} rows): " + ", ".join(
        f"{k} {v:.4f}" for k, v in accs.items())


def run_round_cancel(args: argparse.Namespace) -> int:
    """Ask the hub to cancel the open round; exit 0 when it did, 1 when it refused (no such open round), 2 when it
    does not answer."""
    op, transport = _operator(args)
    try:
        out = op.cancel(args.reason, args.round, timeout_s=args.reply_timeout)
    finally:
        transport.close()
    if args.json:
        print(json.dumps(out))
    elif out["accepted"]:
        print(f"round {out['round']} cancelled (fleet {out['fleet']!r}): {out['detail']}")
    else:
        print(f"cancel refused by the hub of fleet {out['fleet']!r}: {out['reason']}"
              + (f" ({out['detail']})" if out["detail"] else ""))
    return 0 if out["accepted"] else 1


def _print_start(out: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(out))
    elif out["accepted"] and out.get("reason") == "queued":
        print(f"round {out['round']} queued (fleet {out['fleet']!r}): {out['detail']}")
    elif out["accepted"]:
        print(f"round {out['round']} started (fleet {out['fleet']!r})")
    else:
        print(f"round start refused by the hub of fleet {out['fleet']!r}: {out['reason']}"
              + (f" ({out['detail']})" if out["detail"] else ""))

