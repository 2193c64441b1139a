"""``fedge-agent selftest``: check a freshly set-up device end to end and print ONE JSON object.

Steps: a training runtime is importable, the artifacts verify against their manifest,
local data loads (``--data``, else a small random batch of the manifest's input shape),
backbone features compute, and ``--steps`` SGD steps lower the loss on that data.
Output keys: ``ok``, ``backend``, ``steps``, ``loss_first``/``loss_last`` (mean loss on the
self-test samples before/after training), ``ms_per_step``, ``peak_rss_mb`` and a few more;
on failure ``ok`` is false, ``error`` says why and the exit code is 1.

``--probe`` instead checks every installed back-end the way the agent does before it trains: each in its own
process (a segfault or a hang there is a result, not the end of the self-test), compared with the NumPy reference.
``probe`` maps each back-end to its verdict; ``backend`` is the one ``--backend`` would train with (``auto``: the
first that works); exit code 1 when there is none.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["selftest_main"]

MAX_SAMPLES_IN_BATCHES = 4


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedge-agent selftest", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--artifacts", required=True, help="the exported artifacts directory")
    p.add_argument("--data", help="local data: .npz with x and y, .csv (label last), an image folder (one "
                   "sub-folder per class) or a .csv of file,label; default: a random batch")
    p.add_argument("--backend", default="auto", choices=["auto", "litert", "ort", "numpy"])
    p.add_argument("--steps", type=int, default=20, help="training steps to run (default 20)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default 0.05)")
    p.add_argument("--probe", action="store_true",
                   help="probe every installed back-end in its own process (crash, hang, disagreement with the NumPy "
                        "reference) and report each")
    return p


def _probe(args: argparse.Namespace, report: dict[str, Any]) -> bool:
    from fedge.protocol.manifest import verify_artifacts
    from fedge.runtime.trainers import available_backends
    from fedge.runtime.trainers.probe import probe_backend

    manifest = verify_artifacts(args.artifacts)
    report["model"] = manifest.model
    verdicts = {b: probe_backend(args.artifacts, b) for b in available_backends()}
    report["probe"] = {b: ("ok" if v.ok else v.reason) for b, v in verdicts.items()}
    report["probe_seconds"] = {b: round(v.seconds, 2) for b, v in verdicts.items()}
    usable = [b for b, v in verdicts.items() if v.ok and args.backend in ("auto", b)]
    report["backend"] = usable[0] if usable else None
    if not usable:
        raise RuntimeError(f"no usable back-end for --backend {args.backend}: {report['probe']}")
    return True


def _peak_rss_mb() -> float:
    """Peak resident set of this process in MiB.

    ``VmHWM`` from ``/proc/self/status`` where there is one: Linux carries ``ru_maxrss`` across
    fork+exec, so a self-test started by a large parent would report the parent's peak.
    Elsewhere ``getrusage().ru_maxrss / 1024``.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _run(args: argparse.Namespace, report: dict[str, Any]) -> bool:
    from fedge.core.training import evaluate
    from fedge.protocol.manifest import verify_artifacts
    from fedge.runtime.trainers import available_backends, open_trainer

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    backends = available_backends()
    report["available_backends"] = backends
    if not backends:
        raise RuntimeError("no training runtime is importable: pip install ai-edge-litert")
    manifest = verify_artifacts(args.artifacts)
    report["model"] = manifest.model
    report["backbone_sha256"] = manifest.backbone_sha256
    trainer = open_trainer(args.artifacts, args.backend)
    report["backend"] = trainer.name
    b = trainer.batch_size
    if args.data:
        from fedge.runtime.data import load_local

        data = load_local(args.data, input_shape=manifest.input.shape, layout=manifest.input.layout)
        x, y = data.x[: MAX_SAMPLES_IN_BATCHES * b], data.y[: MAX_SAMPLES_IN_BATCHES * b]
        report["data"] = str(data.path)
    else:
        rng = np.random.default_rng(0)
        x = rng.random((b, *manifest.input.shape), dtype=np.float32)
        y = rng.integers(0, manifest.num_classes, b)
        report["data"] = "synthetic"
    if x.shape[0] == 0:
        raise ValueError("the data holds no samples")
    report["samples"] = int(x.shape[0])
    t0 = time.perf_counter()
    feats = trainer.features(x)
    report["features_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
    if feats.shape != (x.shape[0], *manifest.features_shape):
        raise RuntimeError(f"backbone features have shape {feats.shape}, expected "
                           f"{(x.shape[0], *manifest.features_shape)}")
    loss_first = evaluate(trainer, feats, y).loss
    starts = list(range(0, x.shape[0], b))
    t0 = time.perf_counter()
    for step in range(args.steps):
        s = starts[step % len(starts)]
        trainer.train_step(feats[s : s + b], y[s : s + b], args.lr)
    seconds = time.perf_counter() - t0
    last = evaluate(trainer, feats, y)
    loss_last, acc = last.loss, last.accuracy
    report.update(
        steps=args.steps,
        loss_first=loss_first,
        loss_last=loss_last,
        accuracy_after=acc,
        ms_per_step=round(seconds * 1e3 / args.steps, 4),
    )
    if not (math.isfinite(loss_first) and math.isfinite(loss_last)):
        raise RuntimeError(f"non-finite loss ({loss_first} -> {loss_last})")
    if not loss_last < loss_first:
        raise RuntimeError(f"training did not lower the loss ({loss_first:.6f} -> {loss_last:.6f})")
    return True


def selftest_main(argv: Sequence[str]) -> int:
    """Run the self-test; print one JSON object on stdout; 0 when everything works, 1 otherwise."""
    args = _parser().parse_args(list(argv))
    report: dict[str, Any] = {"ok": False, "backend": None, "artifacts": args.artifacts}
    code = 0
    try:
        report["ok"] = (_probe if args.probe else _run)(args, report)
    except Exception as exc:  # the self-test reports every failure instead of a traceback
        report["error"] = f"{type(exc).__name__}: {exc}"
        print(f"fedge-agent selftest: FAILED: {report['error']}", file=sys.stderr)
        code = 1
    report["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(report, sort_keys=True))
    return code


if __name__ == "__main__":
    raise SystemExit(selftest_main(sys.argv[1:]))
