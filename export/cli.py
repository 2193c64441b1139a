"""``fedge pretrain`` and ``fedge export`` (registered by ``fedge.cli`` through :func:`add_subcommands`).

No TensorFlow at import time: the handlers import it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fedge.protocol.manifest import Manifest

__all__ = ["add_subcommands", "run_export", "run_pretrain"]

_ZOO_CHOICES = ("auto", "cnn28", "mlp")
_DATASETS = ("auto", "fashion-mnist", "digits")


def add_subcommands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("pretrain", help="pre-train the source model on a data set or your data (saves .keras)")
    p.add_argument("--model", default="auto", choices=_ZOO_CHOICES, help="auto: cnn28 for images, mlp for vectors")
    p.add_argument("--dataset", default="auto", choices=_DATASETS)
    p.add_argument("--data", help="your own source data instead: .npz with x, y or .csv with the label last (inputs "
                   "are normalised inside the model; the epochs are picked by early stopping on held-out rows)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs on --dataset (default 2); with --data the most early stopping may run (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="model.keras", help="output .keras file")
    p.set_defaults(handler=run_pretrain)

    e = sub.add_parser(
        "export",
        help="export a model to the artifacts folder (model.tflite, backbone.onnx, ort/head, head.npz, manifest.json)",
        description=(
            "--model is a .keras file (any Keras model LiteRT converts with built-in ops; the layers from "
            "--head-start on are the trainable head: dense layers, or the last conv block and dense layers; "
            "everything before is the frozen backbone) or a zoo name. A zoo name is pre-trained first on "
            "--dataset (a few seconds) unless --untrained is given. "
            "--backbone takes an ONNX feature extractor instead (e.g. from torch.onnx.export, NCHW) and adds a "
            "fresh head of --num-classes. Every export is verified against the source before it is written."
        ),
    )
    e.add_argument("--model", default="auto", help="path to a .keras file, or auto|cnn28|mlp")
    e.add_argument("--backbone", help="an ONNX feature extractor (input [N, ...], output [N, F]) instead of --model")
    e.add_argument("--hidden", type=int, default=0, help="with --backbone: a hidden ReLU head layer of this width")
    e.add_argument("--quantize", choices=("int8", "dynamic"),
                   help="ship the backbone as a quantised features-only backbone.tflite (int8 needs --calibration)")
    e.add_argument("--calibration", help="int8 calibration data: .npz with x (also the verification samples)")
    e.add_argument("--out", required=True, help="artifacts folder")
    e.add_argument("--head-start", default=None, help="first head layer (default: head0, else the last layer)")
    e.add_argument("--train-batch", type=int, default=32, help="fixed batch size of the TFLite train signatures")
    e.add_argument("--untrained", action="store_true", help="zoo model with fresh seeded weights, no pre-training")
    e.add_argument("--dataset", default="auto", choices=_DATASETS, help="pre-training data for a zoo name")
    e.add_argument("--epochs", type=int, default=2, help="pre-training epochs for a zoo name")
    e.add_argument("--num-classes", type=int, default=10, help="classes of an --untrained zoo model or a --backbone")
    e.add_argument("--input-dim", type=int, default=64, help="input size of an --untrained mlp")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--no-ort", action="store_true", help="skip the ort/ training artifacts")
    e.set_defaults(handler=run_export)


def run_pretrain(args: argparse.Namespace) -> int:
    from fedge.export.pretrain import VALIDATION_FRACTION, pretrain_report

    r = pretrain_report(args.model, args.dataset, args.epochs, args.seed, args.out, data_file=args.data,
                        progress=True)
    if r.normalized:
        how = (f"{r.epochs} epoch(s) kept of {r.epochs_run} run (early stopping on {VALIDATION_FRACTION:.0%} "
               f"held-out rows, validation loss {r.val_loss:.4f}), inputs normalised inside the model")
        print(f"pre-trained {r.model} on {r.dataset} in {r.seconds:.1f} s: {how}: test accuracy {r.test_accuracy:.3f}")
    else:
        print(f"pre-trained {r.model} on {r.dataset} for {r.epochs} epoch(s) in {r.seconds:.1f} s: "
              f"test accuracy {r.test_accuracy:.3f}")
    print(f"saved {r.path}")
    return 0


def _summary(m: Manifest, out: Path, seconds: float) -> str:
    lines = [
        f"exported {m.model} to {out} in {seconds:.1f} s",
        f"  input x {list(m.input.shape)}  features {m.feature_dim}  classes {m.num_classes}  "
        f"train batch {m.train_batch}",
        f"  head {', '.join(f'{p.name}{list(p.shape)}' for p in m.head)}  ({' -> '.join(m.head_activations)})",
        f"  backbone sha256 {m.backbone_sha256[:16]}...",
    ]
    lines += [f"  {name:32s} {entry.size:>10,d} B  {entry.role}" for name, entry in sorted(m.files.items())]
    return "\n".join(lines)


def run_export(args: argparse.Namespace) -> int:
    from fedge.export.exporter import export
    from fedge.export.pretrain import pretrain_report
    from fedge.export.zoo import ZOO

    start = time.perf_counter()
    out = Path(args.out)
    model: str = args.model
    is_zoo = (model in ZOO or model == "auto") and not Path(model).exists() and args.backbone is None
    if is_zoo and args.untrained:
        if model == "auto":
            model = "cnn28"
        print(f"{model}: fresh untrained weights (seed {args.seed})")
    elif is_zoo:
        keras_path = out.with_name(out.name + "-source.keras")
        r = pretrain_report(model, args.dataset, args.epochs, args.seed, keras_path)
        print(f"pre-trained {r.model} on {r.dataset} for {args.epochs} epoch(s) in {r.seconds:.1f} s: "
              f"test accuracy {r.test_accuracy:.3f}; saved {keras_path}")
        model = str(keras_path)
    shown: list[str] = []

    def report(line: str) -> None:
        if not shown:
            print("verifying every artifact against the source (max abs difference):")
        shown.append(line)
        print(line, flush=True)

    result = export(
        model,
        out,
        args.head_start,
        args.train_batch,
        args.num_classes,
        input_dim=args.input_dim,
        seed=args.seed,
        with_ort=False if args.no_ort else None,
        backbone=args.backbone,
        hidden=args.hidden,
        quantize=args.quantize,
        calibration=args.calibration,
        report=report,
    )
    print(_summary(result.manifest, out, time.perf_counter() - start))
    return 0
