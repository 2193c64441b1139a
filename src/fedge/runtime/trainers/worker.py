"""The child side of :class:`~fedge.runtime.trainers.isolated.IsolatedTrainer`: one trainer in its own process.

Started as ``python -m fedge.runtime.trainers.worker FD`` with ``FD`` one end of a socket pair (a
:class:`multiprocessing.connection.Connection`). The first request opens the trainer; later ones call its
methods. Every request is ``(method, args)``; every answer ``("ok", value)`` or
``("error", kind, message, field, problem)`` for an exception the trainer raised (the worker keeps serving).
A native crash (a segfault in a runtime) kills this process and nothing else: the parent sees the connection
close and the exit signal. ``faulthandler`` prints the Python stack of such a crash on stderr, which the parent
logs.

``FEDGE_WORKER_FAULT=BACKEND:KIND:METHOD[:N]`` makes a worker of ``BACKEND`` crash (``segv``: a real SIGSEGV), hang
(``hang``) or compute wrong results (``skew``: every head parameter shifted by 0.1 after the call) at its ``N``-th
call (default the first) of ``METHOD``: the fault injection of the agent's tests, which need a broken back-end
without a broken runtime at hand. Unset, nothing is injected.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["FAULT_ENV", "serve"]

FAULT_ENV = "FEDGE_WORKER_FAULT"
METHODS = ("features", "get_head", "set_head", "train_step", "logits")


class _Fault:
    """The injected fault of ``FEDGE_WORKER_FAULT`` (none when unset)."""

    def __init__(self, spec: str) -> None:
        parts = spec.split(":") if spec else []
        if parts and (len(parts) not in (3, 4) or parts[1] not in ("segv", "hang", "skew")
                      or (len(parts) == 4 and not parts[3].isdigit())):
            raise ValueError(f"{FAULT_ENV}={spec!r}: expected BACKEND:segv|hang|skew:METHOD[:N]")
        self.backend, self.kind, self.method = (parts[:3] if parts else ("", "", ""))
        self.at = int(parts[3]) if len(parts) == 4 else 1
        self.calls = 0

    def check(self, backend: str, method: str) -> bool:
        """Crash or hang now if this call is the one; True when its result should be skewed."""
        if not self.kind or backend != self.backend or method != self.method:
            return False
        self.calls += 1
        if self.calls == self.at and self.kind != "skew":
            _crash(self.kind)
        return self.kind == "skew" and self.calls >= self.at


def _crash(kind: str) -> None:
    if kind == "segv":
        import ctypes

        ctypes.string_at(0)  # reads address 0: SIGSEGV, as a broken native kernel would
    elif kind == "hang":
        time.sleep(3600)


def _open(artifacts_dir: str, backend: str) -> Any:
    from fedge.runtime.trainers import open_trainer

    return open_trainer(artifacts_dir, backend)


def serve(conn: Connection) -> int:
    """Answer requests until the parent closes the connection; returns the exit code."""
    trainer: Any = None
    backend = ""
    fault = _Fault(os.environ.get(FAULT_ENV, ""))
    while True:
        try:
            method, args = conn.recv()
        except (EOFError, OSError):
            return 0
        try:
            if method == "open":
                backend = str(args[1])
                fault.check(backend, "open")
                trainer = _open(*args)
                value: Any = {"name": trainer.name, "batch_size": int(trainer.batch_size)}
            elif method in METHODS and trainer is not None:
                skew = fault.check(backend, method)
                value = getattr(trainer, method)(*args)
                if skew:
                    trainer.set_head({k: v + 0.1 for k, v in trainer.get_head().items()})
            else:
                raise ValueError(f"unknown request {method!r} (or no trainer open)")
        except Exception as exc:  # reported to the parent, which raises it again there
            field, problem = getattr(exc, "field", None), getattr(exc, "problem", None)  # a ConfigError's parts
            conn.send(("error", type(exc).__name__, str(exc), field, problem))
            continue
        conn.send(("ok", value))


def main(argv: list[str]) -> int:
    faulthandler.enable()  # a segfault prints the Python stack (which call) on stderr before the process dies
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m fedge.runtime.trainers.worker FD", file=sys.stderr)
        return 2
    with Connection(int(argv[0])) as conn:
        return serve(conn)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
