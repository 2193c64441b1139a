"""The ``fedge`` command: every package registers its own sub-commands here.

Heavy imports (TensorFlow, amqtt, matplotlib) happen inside the handlers, so ``fedge --help``
is fast and the hub runs without TensorFlow.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from fedge.protocol.errors import FedgeError
from fedge.protocol.logs import configure_logging


def _add_partition(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("partition", help="split a data set non-IID across N devices (one file each)")
    p.add_argument("--dataset", default="auto", choices=["auto", "fashion-mnist", "digits"])
    p.add_argument("--devices", type=int, default=5)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration over labels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rotate", type=float, default=0.0, help="base rotation of every device (degrees)")
    p.add_argument("--contrast", type=float, default=1.0)
    p.add_argument("--noise", type=float, default=0.0)
    p.add_argument("--out", required=True)
    p.set_defaults(handler=_run_partition)


def _run_partition(args: argparse.Namespace) -> int:
    from fedge.datasets.partition import run_partition

    paths = run_partition(
        args.dataset, args.devices, args.alpha, args.seed, args.rotate, args.contrast, args.noise, args.out
    )
    for path in paths:
        print(path)
    return 0


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="embedded broker + hub + N agent processes on real data; prints a report")
    p.add_argument("--devices", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="demo-out", help="work folder (artifacts, data, state, report)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object, no table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--http", metavar="HOST:PORT",
                   help="the hub serves its fleet dashboard and /metrics here; the URL is printed (off loopback with "
                        "a random token)")
    p.add_argument("--hold", action="store_true", help="keep the fleet running after the last round until Ctrl-C")
    p.add_argument("--secagg", action="store_true",
                   help="secure aggregation: the hub learns only the sum of the devices' updates (PROTOCOL.md §9)")
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from fedge.demo import run_demo

    return run_demo(args.devices, args.rounds, args.out, as_json=args.json, seed=args.seed, http=args.http,
                    hold=args.hold, secagg=args.secagg)


def _add_simulate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("simulate", help="N virtual devices in one process (no MQTT), the real training, DP and "
                                        "aggregation code; prints the demo's report plus epsilon")
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="simulate-out",
                   help="work folder (source model, artifacts, data, report); reuse one to skip pre-training")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object, no table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", choices=["auto", "litert", "ort", "numpy"])
    p.add_argument("--dp-mode", default="off", choices=["off", "central", "local"])
    noise = p.add_mutually_exclusive_group()
    noise.add_argument("--noise-multiplier", type=float, default=None, help="z (default 1 under DP)")
    noise.add_argument("--epsilon", type=float, default=None,
                       help="target epsilon after --rounds rounds: picks the smallest z that stays within it")
    p.add_argument("--clip", type=float, default=1.0, help="C: L2 norm every update is clipped to")
    p.add_argument("--sample-rate", type=float, default=0.1, help="q: Poisson sampling rate of each round (DP)")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--amplification", action="store_true",
                   help="central DP: count rounds as Poisson-subsampled, like the hub's [privacy] amplification")
    p.add_argument("--fraction", type=float, default=1.0, help="share of the devices selected per round (no DP)")
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--proximal-lambda", type=float, default=0.0,
                   help="lambda of the pull toward the source head (the hub default 0: measured, see README)")
    p.add_argument("--validation-fraction", type=float, default=0.2,
                   help="share of each device's data held out for federated evaluation (the agent's default; 0: none)")
    p.add_argument("--local-only-epochs", type=int, default=20,
                   help="epochs budget of each device's local-only baseline and personal head (early-stopped)")
    p.add_argument("--personalization", default="auto", choices=["auto", "finetune", "ditto"],
                   help="each device's own head: auto (the best of global, fine-tuned and local-only by "
                        "cross-validation on its training rows), the fine-tuned global head, or a ditto head")
    p.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="where the virtual devices train: this process, or a Ray cluster (the ray extra)")
    p.add_argument("--ray-address", default=None,
                   help="--engine ray: an existing cluster's address (default: start a local one)")
    p.add_argument("--compression", default=None, choices=["int8", "int4"],
                   help="compressed updates (stochastic rounding, error feedback), as the hub's [rounds] compression")
    p.add_argument("--samples-per-device", type=int, default=None,
                   help="cap every device at this many training rows (stratified, seeded): the small-data regime")
    p.add_argument("--ditto-mu", type=float, default=0.1, help="ditto: strength of the pull toward the global head")
    gate = p.add_mutually_exclusive_group()
    gate.add_argument("--deploy-tolerance", type=float, default=0.01,
                      help="deploy gate: keep the deployed version when a new one's held-out accuracy is lower by "
                           "more than this (the hub's default)")
    gate.add_argument("--no-deploy-gate", action="store_true", help="deploy every new version")
    p.add_argument("--candidate", action="append", default=[], metavar="NAME=ARTIFACTS_DIR",
                   help="run a source-model selection round first among the demo's model (source) and these "
                        "exported models (repeatable); the rounds start from the winner")
    p.set_defaults(handler=_run_simulate)


def _run_simulate(args: argparse.Namespace) -> int:
    from fedge.simulate import run_simulate, settings_from_args

    settings = settings_from_args(
        args.devices, args.rounds, args.seed, dp_mode=args.dp_mode, noise_multiplier=args.noise_multiplier,
        target_epsilon=args.epsilon, clip=args.clip, sample_rate=args.sample_rate, delta=args.delta,
        local_epochs=args.local_epochs, lr=args.lr, proximal_lambda=args.proximal_lambda, fraction=args.fraction,
        amplification=args.amplification, validation_fraction=args.validation_fraction,
        local_only_epochs=args.local_only_epochs, personalization=args.personalization, ditto_mu=args.ditto_mu,
        deploy_tolerance=None if args.no_deploy_gate else args.deploy_tolerance,
        samples_per_device=args.samples_per_device, compression=args.compression,
    )
    from fedge.simulate_selection import parse_candidates

    return run_simulate(settings, args.out, as_json=args.json, backend=args.backend,
                        candidates=parse_candidates(args.candidate), engine=args.engine, address=args.ray_address)


def _add_fleet(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("fleet", help="a fleet's broker set-up: CA, TLS, accounts, ACLs, hub signing key")
    fsub = p.add_subparsers(dest="fleet_command", required=True)
    p = fsub.add_parser("init", help="write a fleet folder: CA, broker certificate, mosquitto.conf, passwd, acl, "
                                     "hub.toml, operator.toml, the hub's signing key")
    p.add_argument("--fleet", required=True)
    p.add_argument("--dir", required=True, help="the fleet folder (created, mode 0700)")
    p.add_argument("--broker-host", default="localhost", help="the name or address devices use for the broker "
                                                              "(in its certificate, with 127.0.0.1 and localhost)")
    p.add_argument("--port", type=int, default=8883, help="the broker's TLS port")
    p.add_argument("--bind", help="address the broker listens on (default: every interface)")
    p.add_argument("--artifacts", default="artifacts", help="the exported model, for hub.toml")
    p.add_argument("--broker-user", help="the account mosquitto runs as when started as root (default: you, or, when "
                                         "you are root, the unprivileged user mosquitto, else nobody)")
    p.set_defaults(handler=_run_fleet_init)
    p = fsub.add_parser("rotate-key", help="replace the hub's signing key with a new one signed by the old one "
                                           "(restart the hub afterwards; devices follow the signed rotation)")
    p.add_argument("--dir", required=True, help="the fleet folder of fedge fleet init")
    p.set_defaults(handler=_run_rotate_key)


def _run_rotate_key(args: argparse.Namespace) -> int:
    from fedge.devices.fleet import rotate_signing_key

    path = rotate_signing_key(args.dir)
    print(f"new hub signing key in {args.dir}; rotation {path.name} vouches for it: restart the hub to sign with it")
    return 0


def _run_fleet_init(args: argparse.Namespace) -> int:
    from fedge.devices.fleet import init_fleet

    d = init_fleet(args.fleet, args.dir, broker_host=args.broker_host, port=args.port, bind=args.bind,
                   artifacts=args.artifacts, broker_user=args.broker_user)
    print(f"fleet {args.fleet!r} in {d.root}\n"
          f"  broker:   mosquitto -c {d.mosquitto_conf}\n"
          f"  hub:      fedge hub serve --config {d.hub_toml}\n"
          f"  devices:  fedge devices provision --fleet-dir {d.root} ... (then reload the broker: SIGHUP)\n"
          f"  operator: fedge round start --fleet {args.fleet} --broker-config {d.operator_toml}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fedge.devices.cli import add_subcommands as add_devices
    from fedge.export.cli import add_subcommands as add_export
    from fedge.hub.serve import add_subcommands as add_hub

    parser = argparse.ArgumentParser(prog="fedge", description="federated transfer learning on edge devices")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    add_export(sub)
    _add_partition(sub)
    add_hub(sub)
    _add_demo(sub)
    _add_simulate(sub)
    add_devices(sub)
    _add_fleet(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.verbose:  # third-party noise (TensorFlow/absl C++ logs, oneDNN notices) only with -v
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        logging.getLogger("absl").setLevel(logging.ERROR)
    else:  # 0 also lets native start-up notices through (fedge.runtime.native_log)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
    # the demo prints its own progress: fedge's INFO logs only with -v there
    quiet_command = args.command in ("demo", "simulate", "round")
    configure_logging(logging.DEBUG if args.verbose else logging.WARNING if quiet_command else logging.INFO)
    try:
        code: int = args.handler(args)
    except FedgeError as exc:
        print(f"fedge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
