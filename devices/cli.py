"""``fedge devices ...``: list profiles, provision bundles, flash them onto devices."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

from fedge.devices.flash import flash
from fedge.devices.fleet import FleetDir, password_entries, remove_device
from fedge.devices.profiles import builtin_profiles, get_profile
from fedge.devices.provision import Provisioning, provision
from fedge.protocol.errors import ConfigError


def add_subcommands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("devices", help="device-class profiles, provisioning and flashing")
    dsub = p.add_subparsers(dest="devices_command", required=True)
    dsub.add_parser("list", help="built-in device profiles").set_defaults(handler=_list)
    prov = dsub.add_parser("provision", help="write a device bundle: agent.toml, credentials, service, installer")
    prov.add_argument("--profile", required=True, help="built-in profile name or a profile .toml")
    prov.add_argument("--device-id", required=True)
    prov.add_argument("--fleet", required=True)
    prov.add_argument("--broker", help="mqtt://host:port or mqtts://host:port (default with --fleet-dir: the fleet's "
                                       "mqtts:// URL)")
    prov.add_argument("--fleet-dir", help="the fleet folder of fedge fleet init: the device gets a broker account, the "
                                          "bundle the fleet's CA certificate and the hub's public key")
    prov.add_argument("--data", required=True, help="path of the local data file on the device")
    prov.add_argument("--install-dir", default="/opt/fedge", help="absolute path on the device (plain characters)")
    prov.add_argument("--user", default="fedge", help="the system user the agent runs as (created if missing)")
    prov.add_argument("--wheel", help="bundle this fedge wheel, or build one from this source folder "
                                      "(pip wheel --no-deps); default: the installer pins this fedge's version")
    prov.add_argument("--artifacts", help="the fleet's exported model (fedge export): bundled, and the installer "
                      "self-tests the device with it (fedge-agent selftest --probe) before it starts the agent")
    prov.add_argument("--out", default="bundles")
    prov.set_defaults(handler=_provision)
    fl = dsub.add_parser("flash", help="copy a bundle to user@host over SSH and install it (or into a mounted root)")
    fl.add_argument("--bundle", required=True)
    fl.add_argument("--target", required=True, help="user@host, or a folder where the device's root is mounted")
    fl.add_argument("--dry-run", action="store_true", help="print the commands only")
    fl.set_defaults(handler=_flash)
    rv = dsub.add_parser("revoke", help="remove a device's broker account from a fleet folder (then reload the broker)")
    rv.add_argument("--fleet-dir", required=True, help="the fleet folder of fedge fleet init")
    rv.add_argument("device_id", metavar="DEVICE_ID")
    rv.set_defaults(handler=_revoke)


def _list(args: argparse.Namespace) -> int:
    print(json.dumps({name: asdict(p) for name, p in builtin_profiles().items()}, indent=2))
    return 0


def _provision(args: argparse.Namespace) -> int:
    fleet_dir = None if args.fleet_dir is None else Path(args.fleet_dir)
    broker = args.broker or (None if fleet_dir is None else FleetDir.at(fleet_dir).read()["broker_url"])
    if broker is None:
        raise ConfigError("broker", "give --broker URL or --fleet-dir DIR")
    existed = fleet_dir is not None and args.device_id in password_entries(FleetDir.at(fleet_dir).passwd)
    p = Provisioning(args.device_id, args.fleet, broker, args.data, args.install_dir, args.user)
    wheel = None if args.wheel is None else Path(args.wheel)
    artifacts = None if args.artifacts is None else Path(args.artifacts)
    bundle = provision(p, get_profile(args.profile), Path(args.out), wheel=wheel, fleet_dir=fleet_dir,
                       artifacts=artifacts)
    print(bundle)
    if fleet_dir is not None:
        what = ("already had an account: its password is REPLACED (older bundles of it are locked out)" if existed
                else f"added to {fleet_dir}/passwd")
        print(f"{args.device_id} {what}; reload the broker to apply: kill -HUP \"$(cat {fleet_dir}/mosquitto.pid)\"",
              file=sys.stderr)
    return 0



def _revoke(args: argparse.Namespace) -> int:
    d = remove_device(Path(args.fleet_dir), args.device_id)
    print(f"{args.device_id} removed from {d.passwd}: reload the broker (kill -HUP \"$(cat {d.root}/mosquitto.pid)\") "
          "to refuse its next connection; also drop it from the hub's devices list, if any (a revoked device sends no "
          "last will, so the hub sees it online until it restarts)", file=sys.stderr)
    return 0


def _flash(args: argparse.Namespace) -> int:
    for cmd in flash(Path(args.bundle), args.target, dry_run=args.dry_run):
        print(shlex.join(cmd))
    return 0


__all__ = ["add_subcommands"]
