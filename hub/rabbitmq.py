"""A private RabbitMQ node with its MQTT plugin: generated config, free ports, no systemd (stdlib only).

Used by the tests and the benches as the clusterable broker next to mosquitto (``docs/BROKERS.md``). Debian's
``rabbitmq-server`` 3.10 speaks MQTT 3.1.1 only; fedge's transport falls back to it at once (the node closes an
MQTT 5 CONNECT without a CONNACK).

The node runs from environment variables alone (``RABBITMQ_NODENAME``, ``RABBITMQ_MNESIA_BASE``,
``RABBITMQ_LOG_BASE``, ``RABBITMQ_ENABLED_PLUGINS_FILE``, ``RABBITMQ_CONFIG_FILE``, ``RABBITMQ_DIST_PORT``,
``ERL_EPMD_PORT``, ``HOME``) with everything under ``workdir``. Its own ``epmd`` runs as a child process on a free
port (never a daemon shared with other nodes), so :meth:`RabbitMQ.stop` ends exactly what :meth:`RabbitMQ.start`
started: SIGTERM to the ``rabbitmq-server`` script (it stops the Erlang VM gracefully and exits), then the epmd.

Accounts: RabbitMQ authenticates every user name a client presents (fedge's transport presents its client id
when no ``username`` is configured), so fedge clients log in with :meth:`RabbitMQ.account`: one generated user with
a random password, on a virtual host of their own. ``vhosts`` names extra virtual hosts created at boot
(``load_definitions``): each is an isolated broker (sessions, queues and retained messages), which lets one node
serve many tests; a client picks one with the user name ``<vhost>:<user>``. Clients without a user name are
admitted as ``guest`` on ``/`` (``mqtt.allow_anonymous``: the benches' simulated devices).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedge.hub.mosquitto import free_port, stop_process, wait_port

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
EPMD = "/usr/bin/epmd"
PREFETCH = 1000

__all__ = ["EPMD", "RABBITMQ_SERVER", "RabbitMQ", "available", "cluster"]


def available() -> bool:
    """Whether Debian's ``rabbitmq-server`` (and epmd) are installed (``make system-deps``)."""
    return os.access(RABBITMQ_SERVER, os.X_OK) and os.access(EPMD, os.X_OK)


class RabbitMQ:
    """A RabbitMQ node on ``host:port`` (MQTT; a free port by default) with a generated config in ``workdir``.

    Retained messages (a disk store) and persistent sessions (durable queues) survive :meth:`restart`; ``fresh``
    on :meth:`start` wipes them. Used as a context manager it is started and stopped.
    """

    kind = "rabbitmq"

    def __init__(self, workdir: str | Path, port: int | None = None, *, host: str = "127.0.0.1",
                 vhosts: Sequence[str] = (), user: str = "fedge", extra_conf: str = "",
                 binary: str = RABBITMQ_SERVER, password: str | None = None, epmd_port: int | None = None,
                 home: Path | None = None, cluster: Sequence[str] = ()) -> None:
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port or free_port(host)
        self.dist_port = free_port(host)
        self.own_epmd = epmd_port is None  # a cluster's nodes share one epmd (they find each other through it)
        self.epmd_port = epmd_port or free_port(host)
        self.home = (home or self.workdir / "home").resolve()  # its .erlang.cookie: one per cluster
        self.cluster = tuple(cluster)  # every node of the cluster (classic_config peer discovery), or none
        self.binary = binary
        self.user = user
        self.password = password or secrets.token_urlsafe(18)
        self.vhosts = tuple(vhosts)
        self.node = f"fedge-{self.port}@localhost"
        self.log = self.workdir / "rabbitmq.log"
        self.conf = self.workdir / "rabbitmq.conf"
        self.definitions = self.workdir / "definitions.json"
        self.proc: subprocess.Popen[bytes] | None = None
        self.epmd: subprocess.Popen[bytes] | None = None
        self.extra_conf = extra_conf
        self._write_files()

    # -- configuration ----------------------------------------------------------------------------------
    def _write_files(self) -> None:
        (self.workdir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        lines = [
            "listeners.tcp = none",  # no AMQP listener: MQTT only (the CLI tools use the distribution port)
            f"mqtt.listeners.tcp.default = {self.host}:{self.port}",
            "mqtt.allow_anonymous = true",
            "mqtt.default_user = guest",
            "mqtt.default_pass = guest",
            "mqtt.vhost = /",
            # unacknowledged QoS 1 messages per subscriber (default 10): the hub acknowledges after its group
            # commit, so this bounds a commit's batch (docs/BROKERS.md)
            f"mqtt.prefetch = {PREFETCH}",
            "loopback_users = none",
            f"load_definitions = {self.definitions}",
            "log.file.level = warning",
            "log.console = false",
            *(["cluster_formation.peer_discovery_backend = classic_config"]
              + [f"cluster_formation.classic_config.nodes.{i} = {n}" for i, n in enumerate(self.cluster, 1)]
              if self.cluster else []),
            self.extra_conf,
            "",
        ]
        self.conf.write_text("\n".join(lines))
        vhosts = ["/", *self.vhosts]
        users = [{"name": self.user, "password": self.password, "tags": "administrator"},
                 {"name": "guest", "password": "guest", "tags": ""}]
        perms = [{"user": u["name"], "vhost": v, "configure": ".*", "write": ".*", "read": ".*"}
                 for u in users for v in vhosts]
        defs: dict[str, Any] = {"users": users, "vhosts": [{"name": v} for v in vhosts], "permissions": perms}
        fd = os.open(self.definitions, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the password
        with open(fd, "w", encoding="utf-8") as fh:
            json.dump(defs, fh)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def account(self, vhost: str = "/") -> dict[str, str]:
        """A ``[broker]`` table logging in as the generated user on ``vhost`` (one of ``vhosts``, or ``/``)."""
        if vhost not in ("/", *self.vhosts):
            raise ValueError(f"vhost {vhost!r} was not created; created: / {' '.join(self.vhosts)}")
        name = self.user if vhost == "/" else f"{vhost}:{self.user}"
        return {"url": self.url, "username": name, "password": self.password}

    def _env(self) -> dict[str, str]:
        home = self.home
        home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update({
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_MNESIA_BASE": str(self.workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.workdir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.workdir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.workdir / "rabbitmq"),  # the node reads rabbitmq.conf
            "RABBITMQ_PID_FILE": str(self.workdir / "rabbitmq.pid"),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "HOME": str(home),
        })
        return env

    # -- processes --------------------------------------------------------------------------------------
    def start(self, timeout_s: float = 120.0, *, fresh: bool = False) -> RabbitMQ:
        """Start epmd and the node (no-op when running); return once the MQTT listener accepts connections.
        ``fresh``: forget every session, queue and retained message first."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        if fresh:
            shutil.rmtree(self.workdir / "mnesia", ignore_errors=True)
        env = self._env()
        with self.log.open("ab") as log:
            if self.own_epmd and (self.epmd is None or self.epmd.poll() is not None):
                self.epmd = subprocess.Popen([EPMD, "-port", str(self.epmd_port)], stdout=log, stderr=log, env=env)
                wait_port(self.host, self.epmd_port, 10)
            self.proc = subprocess.Popen([self.binary], stdout=log, stderr=log, env=env, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-3000:]
                self.stop()
                raise RuntimeError(f"rabbitmq-server exited with {self.proc_returncode()}:\n{tail}")
            try:
                wait_port(self.host, self.port, 0.5)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    tail = self.log.read_text(errors="replace")[-3000:]
                    self.stop()
                    raise RuntimeError(f"RabbitMQ's MQTT listener did not open in {timeout_s} s:\n{tail}") from None
        self.wait_ready("/", max(deadline - time.monotonic(), 1.0))
        return self

    def wait_ready(self, vhost: str = "/", timeout_s: float = 60.0) -> None:
        """Return once an MQTT client can log in on ``vhost``: the listener opens before every virtual host has
        started (a login meanwhile is refused: "vhost is down")."""
        from fedge.protocol.errors import TransportError
        from fedge.protocol.mqtt_config import BrokerConfig
        from fedge.protocol.transport_mqtt import MqttTransport

        cfg = BrokerConfig.from_mapping({**self.account(vhost), "protocol": "3.1.1"})
        deadline = time.monotonic() + timeout_s
        while True:
            probe = MqttTransport(cfg, f"fedge-probe-{os.getpid()}", session_expiry_s=0)
            try:
                probe.connect(timeout_s=5)
                probe.close(flush_timeout_s=0)
                return
            except TransportError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"RabbitMQ vhost {vhost!r} not ready after {timeout_s} s: {exc}") from None
                time.sleep(0.2)

    def proc_returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    def _beam_pid(self) -> int | None:
        try:
            return int((self.workdir / "rabbitmq.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop_node(self, timeout_s: float = 60.0) -> None:
        """Stop the node (SIGTERM: the script stops the VM gracefully); epmd keeps running for a restart."""
        proc, self.proc = self.proc, None
        beam = self._beam_pid()
        if proc is not None:
            stop_process(proc, timeout_s)
        if beam is not None and _alive(beam):  # the script died without taking the VM along
            os.kill(beam, signal.SIGKILL)
            _wait_gone(beam, 10)
        (self.workdir / "rabbitmq.pid").unlink(missing_ok=True)

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop the node and its epmd."""
        self.stop_node(timeout_s)
        epmd, self.epmd = self.epmd, None
        if epmd is not None:
            stop_process(epmd, 10)

    def restart(self) -> None:
        """Stop and start on the same ports: sessions, queued messages and retained messages survive."""
        self.stop_node()
        self.start()

    def __enter__(self) -> RabbitMQ:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    """A running process (a zombie waiting for its parent is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def cluster(workdir: str | Path, nodes: int = 2, *, host: str = "127.0.0.1", vhosts: Sequence[str] = (),
            user: str = "fedge") -> list[RabbitMQ]:
    """``nodes`` RabbitMQ nodes forming one cluster (not started): one Erlang cookie, one epmd (run by the first
    node), classic_config peer discovery; each node its own MQTT port. Start the first node, then the others (they
    join it at boot); stop them in reverse order."""
    root = Path(workdir).resolve()
    ports = [free_port(host) for _ in range(nodes)]
    names = [f"fedge-{port}@localhost" for port in ports]
    first = RabbitMQ(root / "node0", ports[0], host=host, vhosts=vhosts, user=user, home=root / "home",
                     cluster=names)
    return [first] + [RabbitMQ(root / f"node{i}", ports[i], host=host, vhosts=vhosts, user=user,
                               password=first.password, epmd_port=first.epmd_port, home=root / "home", cluster=names)
                      for i in range(1, nodes)]
