"""``fedge-agent`` / ``python -m edge_agent``: ``run --config agent.toml``, ``selftest ...``, ``version``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from fedge.protocol.errors import FedgeError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedge-agent", description="fedge edge agent: federated fine-tuning on a device")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve rounds from the hub until SIGTERM/SIGINT")
    run.add_argument("--config", required=True, help="path to agent.toml")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.add_argument("--connect-timeout", type=float, default=30.0, help="seconds to wait for the broker at start")
    st = sub.add_parser("selftest", help="check this device: runtimes, artifacts, a few training steps", add_help=False)
    st.add_argument("args", nargs=argparse.REMAINDER)
    sub.add_parser("version", help="print the agent and protocol versions")
    return p


def _run(config_path: str, log_level: str, connect_timeout: float) -> int:
    from fedge.edge_agent.agent import Agent
    from fedge.edge_agent.config import load_config
    from fedge.protocol.logs import configure_logging

    configure_logging(log_level)
    config = load_config(config_path)
    agent = Agent(config)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logging.getLogger("fedge.agent").info("signal %d: shutting down", signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        agent.start(connect_timeout_s=connect_timeout)
        while not stop.wait(1.0):
            pass
    finally:
        agent.stop()
        for s, h in previous.items():
            signal.signal(s, h)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["selftest"]:  # pass everything through, including --help
        from fedge.edge_agent.selftest import selftest_main

        return int(selftest_main(args_in[1:]))
    args = _parser().parse_args(args_in)
    if args.command == "version":
        from fedge.edge_agent.agent import agent_version
        from fedge.protocol.messages import PROTOCOL_VERSION

        print(f"fedge-agent {agent_version()} (protocol {PROTOCOL_VERSION})")
        return 0
    try:
        return _run(args.config, args.log_level, args.connect_timeout)
    except FedgeError as exc:
        print(f"fedge-agent: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
