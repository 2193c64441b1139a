"""A private mosquitto process with a generated config, and loopback port helpers (stdlib only).

Used by the tests, the benchmarks and anyone who wants a real broker next to a hub for a trial run. The
generated config avoids mosquitto's traps: ``max_queued_messages 0`` (the default of 1000 silently drops
QoS 1 messages), unlimited message size and in-flight window, and ``user root`` only when run as root so
that a persistence folder under a temporary directory stays writable.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

MOSQUITTO = "/usr/sbin/mosquitto"

__all__ = ["MOSQUITTO", "Mosquitto", "free_port", "wait_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (bind to port 0 and release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout_s: float = 10.0) -> None:
    """Return once ``host:port`` accepts TCP connections; ``TimeoutError`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing accepts connections on {host}:{port} after {timeout_s} s") from None
            time.sleep(0.02)


def stop_process(proc: subprocess.Popen[Any], timeout_s: float) -> None:
    """SIGTERM a running child and wait; SIGKILL after ``timeout_s`` (a broker's, a node's, a bench's)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Mosquitto:
    """A mosquitto 2.x process on ``host:port`` (a free port by default) with a generated config in ``workdir``.

    ``persistence=True`` keeps sessions and retained messages in ``workdir`` across :meth:`restart`.
    ``extra_conf`` lines are appended to the config (TLS listeners, ACLs, ...). The process is stopped by
    :meth:`stop` (SIGTERM, mosquitto saves its database), also when used as a context manager.
    """

    kind = "mosquitto"

    def __init__(self, workdir: str | Path, port: int | None = None, *, host: str = "127.0.0.1",
                 persistence: bool = True, extra_conf: str = "", binary: str = MOSQUITTO) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port or free_port(host)
        self.binary = binary
        self.conf = self.workdir / "mosquitto.conf"
        self.log = self.workdir / "mosquitto.log"
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            *(["user root"] if os.geteuid() == 0 else []),
            f"persistence {'true' if persistence else 'false'}",
            *([f"persistence_location {self.workdir}/", "autosave_interval 1"] if persistence else []),
            "max_queued_messages 0",
            f"max_queued_bytes {1 << 30}",
            "message_size_limit 0",
            "max_inflight_messages 0",
            "max_connections -1",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            extra_conf,
            "",
        ]
        self.conf.write_text("\n".join(lines))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> Mosquitto:
        """Start the process (no-op when running) and return once it accepts connections."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=log, stderr=log)
        try:
            wait_port(self.host, self.port, timeout_s)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"mosquitto did not start: {self.log.read_text()[-2000:]}") from None
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (mosquitto saves its database) and wait; SIGKILL after ``timeout_s``."""
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc, timeout_s)

    def restart(self) -> None:
        """Stop and start on the same port; with persistence, sessions and retained messages survive."""
        self.stop()
        self.start()

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
