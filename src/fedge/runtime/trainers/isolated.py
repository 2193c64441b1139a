"""A :class:`~fedge.core.trainer.Trainer` whose back-end runs in a child process, so that it cannot crash the agent.

``IsolatedTrainer(artifacts_dir, backend)`` starts ``python -m fedge.runtime.trainers.worker`` and forwards every
Trainer call to it over a socket pair. A native crash of the runtime (a segfault), an exit, or no answer within
``timeout_s`` (``open_timeout_s`` while the worker starts) kills the worker and raises
:class:`~fedge.protocol.errors.TrainerCrash` naming the back-end, the signal and the call; the trainer is then
closed and every later call raises the same error. Exceptions the back-end raises on purpose (``ArtifactError``,
``ValueError``, ...) come back as the same types. The worker's stderr (LiteRT's messages, the Python stack
``faulthandler`` prints on a crash) goes to the ``fedge.trainer`` log.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, Any, NoReturn

import numpy as np
from numpy.typing import NDArray

from fedge.protocol.errors import ArtifactError, ConfigError, DataError, FedgeError, TrainerCrash

__all__ = ["DEFAULT_TIMEOUT_S", "OPEN_TIMEOUT_S", "IsolatedTrainer"]

log = logging.getLogger("fedge.trainer")
F32 = NDArray[np.float32]
DEFAULT_TIMEOUT_S = 120.0
"""Longest wait for one call (features go in chunks of :data:`FEATURE_ROWS` rows, so this bounds a chunk)."""
OPEN_TIMEOUT_S = 300.0
"""Longest wait for the worker to start and open the back-end (a fresh interpreter importing the runtime: seconds on
a Pi, tens of seconds under emulation)."""
FEATURE_ROWS = 1024
_ERRORS: dict[str, type[Exception]] = {
    "ArtifactError": ArtifactError, "DataError": DataError, "ValueError": ValueError, "TypeError": TypeError,
}


def _describe(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"crashed with {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class IsolatedTrainer:
    """The Trainer of ``backend`` over ``artifacts_dir``, run in a worker process (see the module docstring)."""

    def __init__(self, artifacts_dir: str | Path, backend: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 open_timeout_s: float = OPEN_TIMEOUT_S, env: Mapping[str, str] | None = None) -> None:
        self.name = backend
        self.timeout_s = timeout_s
        self._crash: TrainerCrash | None = None
        self._lock = threading.Lock()
        self._stderr: collections.deque[str] = collections.deque(maxlen=40)
        parent, child = socket.socketpair()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "fedge.runtime.trainers.worker", str(child.fileno())],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, env=None if env is None else {**os.environ, **env},
            )
        finally:
            child.close()
        self._conn = Connection(parent.detach())
        self._reader = threading.Thread(target=self._read_stderr, args=(self._proc.stderr,), daemon=True,
                                        name=f"fedge-trainer-{backend}-stderr")
        self._reader.start()
        try:
            info = self._call("open", str(artifacts_dir), backend, timeout_s=open_timeout_s)
        except Exception:
            self.close()  # the back-end could not open the artifacts: its worker goes now
            raise
        self.batch_size = int(info["batch_size"])
        if info["name"] != backend:
            self.close()
            raise ConfigError("backend", f"asked for {backend}, the worker opened {info['name']}")

    # ----------------------------------------------------------------- Trainer
    def features(self, x: F32) -> F32:
        x = np.asarray(x, dtype=np.float32)
        if x.shape[0] <= FEATURE_ROWS:
            return np.asarray(self._call("features", x), dtype=np.float32)
        parts = [np.asarray(self._call("features", x[s : s + FEATURE_ROWS]), dtype=np.float32)
                 for s in range(0, x.shape[0], FEATURE_ROWS)]
        return np.concatenate(parts, axis=0)

    def get_head(self) -> dict[str, F32]:
        head: dict[str, F32] = self._call("get_head")
        return head

    def set_head(self, head: Mapping[str, F32]) -> None:
        self._call("set_head", {k: np.asarray(v) for k, v in head.items()})

    def train_step(self, f: F32, y: NDArray[np.int64], lr: float) -> float:
        return float(self._call("train_step", np.asarray(f), np.asarray(y), float(lr)))

    def logits(self, f: F32) -> F32:
        return np.asarray(self._call("logits", np.asarray(f)), dtype=np.float32)

    # ----------------------------------------------------------------- process
    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return self._crash is None and self._proc.poll() is None

    def close(self) -> None:
        """Stop the worker (it exits when its connection closes; killed after a short wait)."""
        self._conn.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(timeout=5)

    def __enter__(self) -> IsolatedTrainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten trainer must not leave its worker behind
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()

    def _read_stderr(self, stream: IO[bytes] | None) -> None:
        if stream is None:
            return
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self._stderr.append(line)
                log.debug("%s worker: %s", self.name, line)
        stream.close()

    def _call(self, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        wait_s = self.timeout_s if timeout_s is None else timeout_s
        with self._lock:
            if self._crash is not None:
                raise self._crash
            answer = None
            try:
                self._conn.send((method, args))
                if self._conn.poll(wait_s):
                    answer = self._conn.recv()
            except (EOFError, OSError):  # the worker went away: how?
                try:
                    code: int | None = self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    code = None
                self._fail(method, f"{_describe(code)} in {method}")
            if answer is None:
                self._fail(method, f"did not answer {method} within {wait_s:g} s (killed)")
        if answer[0] == "ok":
            return answer[1]
        _, kind, message, field, problem = answer
        if kind == "ConfigError":
            raise ConfigError(field, problem)
        raise _ERRORS.get(kind, FedgeError)(message)

    def _fail(self, method: str, reason: str) -> NoReturn:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._conn.close()
        self._reader.join(timeout=5)
        tail = "\n".join(self._stderr)
        log.error("%s trainer worker (pid %d) %s%s", self.name, self._proc.pid, reason,
                  f"; its last output:\n{tail}" if tail else "")
        self._crash = TrainerCrash(self.name, reason)
        raise self._crash
