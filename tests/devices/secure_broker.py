"""A real mosquitto started from the files of ``fedge fleet init`` (TLS listener on a free loopback port), and the
broker login of each account. Used by tests/devices/test_fleet_init.py and tests/e2e/test_secure_fleet.py."""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

from fedge.devices.fleet import FleetDir, add_device, init_fleet, set_password
from fedge.protocol.mqtt_config import BrokerConfig
from fedge.protocol.tomlfile import read_toml
from tests.helpers import MOSQUITTO, free_port, wait_port

__all__ = ["SecureBroker"]


class SecureBroker:
    """``fleet init`` into ``root/fleet`` with the given devices enrolled; :meth:`start` runs mosquitto on it."""

    def __init__(self, root: Path, fleet: str, devices: list[str], *, artifacts: str = "artifacts",
                 broker_user: str | None = None) -> None:
        self.port = free_port()
        self.fleet = fleet
        if broker_user is None and os.geteuid() == 0:  # pytest's folders are 0700: only root may pass
            broker_user = "root"  # (tests/devices/test_fleet_init.py runs the unprivileged default elsewhere)
        self.dir: FleetDir = init_fleet(fleet, root / "fleet", broker_host="127.0.0.1", port=self.port,
                                        bind="127.0.0.1", artifacts=artifacts, broker_user=broker_user)
        self.passwords: dict[str, str] = {}
        for dev in devices:
            self.passwords[dev] = secrets.token_urlsafe(16)
            add_device(self.dir.root, dev, self.passwords[dev])
        self.url = f"mqtts://127.0.0.1:{self.port}"
        self.log = root / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def add_watcher(self, user: str = "e2e-watcher") -> dict[str, str]:
        """A test account with the hub's rights on the fleet's topics; its ``[broker]`` table. The generated config
        makes the user name the client id, so the test's watcher must not log in as the hub (it would knock the
        hub off); call before :meth:`start`."""
        self.passwords[user] = secrets.token_urlsafe(16)
        set_password(self.dir.passwd, user, self.passwords[user])
        with self.dir.acl.open("a", encoding="utf-8") as fh:
            fh.write(f"user {user}\ntopic readwrite fedge/{self.fleet}/#\n")
        return self.table(user)

    def start(self) -> SecureBroker:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.dir.mosquitto_conf)], stdout=log, stderr=log)
        try:
            wait_port("127.0.0.1", self.port)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"mosquitto did not start: {self.log.read_text()[-2000:]}") from None
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def table(self, account: str) -> dict[str, str]:
        """The ``[broker]`` table of an account: ``hub`` and ``operator`` from the generated files, else a device."""
        if account in ("hub", "operator"):
            path = self.dir.hub_toml if account == "hub" else self.dir.operator_toml
            table = dict(read_toml(path)["broker"])
            table["ca_file"] = str(self.dir.root / table["ca_file"])  # operator.toml's is relative to its folder
            return table
        return {"url": self.url, "username": account, "password": self.passwords[account],
                "ca_file": str(self.dir.ca_cert)}

    def config(self, account: str, **changes: str | None) -> BrokerConfig:
        table = {k: v for k, v in {**self.table(account), **changes}.items() if v is not None}
        return BrokerConfig.from_mapping(table)
