"""Compressed updates: how many bytes a device saves, and what the fleet's model pays for it.

Runs the demo's rounds (``fedge simulate``: the demo task, 5 devices, 5 rounds, the demo hub's settings, no deploy
gate so that every round's head counts) with float32 updates, ``int8`` and ``int4`` (stochastic rounding, error
feedback on every device), for each of ``SEEDS``. ``accuracy_drop_pts``: the final global head's accuracy on the
hub's held-out data, float minus ``int4``, in points, averaged over the seeds (target <= 0.5). ``bytes_ratio``: the
bytes of one real update frame (the protocol's encoding, metrics included, as an agent publishes it: a device's
round on the demo task) in float32 over the same update with ``int4`` codes (target >= 3.5). ``int8`` is reported
beside it (no target).

Prints ONE JSON object with ``--json`` and exits non-zero when a target is missed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._targets import COMPRESSION, finish  # noqa: E402

DEVICES, ROUNDS, SEED = 5, 5, 0
SEEDS = (0, 1, 2)


def frame_bytes(fleet: Any, mode: str | None) -> int:
    """The size of device 0's first-round update frame, as an agent publishes it (``mode``: its compression)."""
    from fedge.core import device as core
    from fedge.core.compress import compress
    from fedge.protocol.codec import encode
    from fedge.protocol.messages import ModelUpdate, RoundAnnounce
    from fedge.simulate_fleet import device_seed

    msg = RoundAnnounce("bench", 1, "v0", fleet.backbone_sha256, 1e12, 1, ("device-00",), 2, 0.05,
                        compression=mode)
    out = core.train(msg, fleet.trainer, core.DeviceData(fleet.feats[0], fleet.labels[0], fleet.keys[0]),
                     core.RoundHeads(fleet.w0, fleet.w0), core.DevicePolicy(device_seed(SEED, 0)), private=False)
    if not isinstance(out, core.Trained):
        raise RuntimeError(f"device 0 did not train: {out}")
    delta: dict[str, Any] = dict(out.delta)
    if mode is not None:
        delta = dict(compress(out.delta, mode, np.random.default_rng(0))[0])
    return len(encode(ModelUpdate("bench", 1, "device-00", "v0", out.n_samples, delta, out.metrics)))


def run(work: Path) -> dict[str, Any]:
    from fedge.demo import DemoPaths
    from fedge.simulate import SimSettings, load_fleet, run_rounds

    paths = DemoPaths(work)
    fleet = load_fleet(paths, DEVICES, SEED)
    out: dict[str, Any] = {"devices": DEVICES, "rounds": ROUNDS, "seeds": list(SEEDS), "backend": fleet.trainer.name}
    accuracy: dict[str, list[float]] = {}
    for mode in (None, "int8", "int4"):
        for seed in SEEDS:  # no deploy gate: every round's head counts, so a regression cannot hide behind it
            run_ = run_rounds(fleet, SimSettings(devices=DEVICES, rounds=ROUNDS, seed=seed, local_epochs=2, lr=0.05,
                                                  proximal_lambda=0.0, validation_fraction=0.2, compression=mode))
            if not all(run_.deployed):
                raise RuntimeError(f"{mode or 'float32'} seed {seed}: a round made no version")
            accuracy.setdefault(mode or "float32", []).append(fleet.score(run_.head)[1])
    mean = {k: float(np.mean(v)) for k, v in accuracy.items()}
    sizes = {mode or "float32": frame_bytes(fleet, mode) for mode in (None, "int8", "int4")}
    out.update(
        accuracy={k: [round(a, 4) for a in v] for k, v in accuracy.items()}, frame_bytes=sizes,
        accuracy_drop_pts=round(100 * (mean["float32"] - mean["int4"]), 2),
        accuracy_drop_int8_pts=round(100 * (mean["float32"] - mean["int8"]), 2),
        bytes_ratio=round(sizes["float32"] / sizes["int4"], 3),
        bytes_ratio_int8=round(sizes["float32"] / sizes["int8"], 3),
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--work", default=str(ROOT / ".fedge" / "bench" / "compression"),
                   help="work folder (the demo task's source model, artifacts and shards; reused between runs)")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return finish({"bench": "bench/compression.py", **run(Path(args.work).resolve())}, COMPRESSION, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
