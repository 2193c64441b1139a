"""Minimal reproducer of the LiteRT ``train_head`` crash on aarch64 (ai-edge-litert 2.3.0).

``python repro_litert.py build DIR`` (needs TensorFlow) writes one-Dense-layer models, each with one signature:

* ``resource_vars``: fedge's formulation: the weights are resource variables, ``train(f, y, mask, lr)`` updates
  them with ``assign_sub`` and returns the loss;
* ``stateless``: ``train(w, b, f, y, mask, lr)`` returns the new weights and the loss (no variables);
* ``stateless_lr_vector``: the same with ``lr`` of shape ``[1]`` instead of a scalar;
* ``scalar_only``: ``op(lr) = lr * 1 + 0``: nothing but one rank-0 input.

``python repro_litert.py run DIR`` (needs only ai-edge-litert and numpy) calls each signature once in a child
process, through LiteRT's stock ``SignatureRunner.__call__`` (which resizes every input to the given value's
shape) and through fedge's ``FixedShapeRunner`` (which never resizes), and prints one JSON object
``{model: {"stock": "ok" | "crashed with SIGSEGV", "fixed": ...}}``.

On x86_64 everything is ``ok``. On aarch64 the stock runner crashes for every model with a rank-0 input,
variables or not, and works for ``stateless_lr_vector``; the fixed-shape runner works for all: the crash is
``ResizeInputTensor`` to rank 0, not training or resource variables (docs/AARCH64.md).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

B, F, C = 32, 64, 10
CHILD = r"""
import sys, numpy as np
from ai_edge_litert.interpreter import Interpreter
path, sig, how = sys.argv[1], sys.argv[2], sys.argv[3]
it = Interpreter(model_path=path)
runner = it.get_signature_runner(sig)
if how == "fixed":
    from fedge.runtime.trainers._litert import FixedShapeRunner
    runner = FixedShapeRunner(runner)
rng = np.random.default_rng(0)
B, F, C = 32, 64, 10
values = {"f": rng.standard_normal((B, F)).astype(np.float32), "y": rng.integers(0, C, B).astype(np.int32),
          "mask": np.ones(B, np.float32), "w": (0.1 * rng.standard_normal((F, C))).astype(np.float32),
          "b": np.zeros(C, np.float32)}
inputs = {}
for name, d in runner.get_input_details().items():
    inputs[name] = values[name] if name != "lr" else np.full(tuple(d["shape"]), 0.1, np.float32)
out = runner(**inputs)
print({k: float(np.asarray(v).sum()) for k, v in out.items()})
"""


def build(out: Path) -> None:
    import numpy as np
    import tensorflow as tf

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w0 = (0.1 * rng.standard_normal((F, C))).astype(np.float32)
    spec = {"f": tf.TensorSpec([B, F], tf.float32, name="f"), "y": tf.TensorSpec([B], tf.int32, name="y"),
            "mask": tf.TensorSpec([B], tf.float32, name="mask"), "lr": tf.TensorSpec([], tf.float32, name="lr"),
            "lr1": tf.TensorSpec([1], tf.float32, name="lr"), "w": tf.TensorSpec([F, C], tf.float32, name="w"),
            "b": tf.TensorSpec([C], tf.float32, name="b")}

    def step(w: Any, b: Any, f: Any, y: Any, mask: Any) -> tuple[Any, Any, Any]:
        logp = tf.nn.log_softmax(tf.matmul(f, w) + b)
        onehot = tf.one_hot(y, C, dtype=tf.float32)
        denom = tf.maximum(tf.reduce_sum(mask), 1.0)
        loss = tf.reduce_sum(mask * -tf.reduce_sum(onehot * logp, axis=1)) / denom
        dz = (tf.exp(logp) - onehot) * tf.reshape(mask / denom, [B, 1])
        return loss, tf.matmul(f, dz, transpose_a=True), tf.reduce_sum(dz, axis=0)

    class Vars(tf.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(w0, name="w")
            self.b = tf.Variable(np.zeros(C, np.float32), name="b")

    m = Vars()

    def train_vars(f: Any, y: Any, mask: Any, lr: Any) -> Any:
        loss, gw, gb = step(m.w, m.b, f, y, mask)
        m.w.assign_sub(lr * gw)
        m.b.assign_sub(lr * gb)
        return {"loss": loss}

    def train_stateless(w: Any, b: Any, f: Any, y: Any, mask: Any, lr: Any) -> Any:
        loss, gw, gb = step(w, b, f, y, mask)
        return {"loss": loss, "w_new": w - lr * gw, "b_new": b - lr * gb}

    models = {
        "resource_vars": (m, "train", train_vars, [spec["f"], spec["y"], spec["mask"], spec["lr"]]),
        "stateless": (tf.Module(), "train", train_stateless,
                      [spec["w"], spec["b"], spec["f"], spec["y"], spec["mask"], spec["lr"]]),
        "stateless_lr_vector": (tf.Module(), "train", train_stateless,
                                [spec["w"], spec["b"], spec["f"], spec["y"], spec["mask"], spec["lr1"]]),
        "scalar_only": (tf.Module(), "op", lambda lr: {"o": lr * 1.0 + 0.0}, [spec["lr"]]),
    }
    for name, (module, sig, fn, specs) in models.items():
        with tempfile.TemporaryDirectory() as tmp:
            sigs = {sig: tf.function(fn, input_signature=specs).get_concrete_function()}
            tf.saved_model.save(module, tmp, signatures=sigs)
            conv = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=[sig])
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
            conv.experimental_enable_resource_variables = True
            (out / f"{name}.tflite").write_bytes(conv.convert())


def _outcome(code: int) -> str:
    if code == 0:
        return "ok"
    if code < 0:
        try:
            return f"crashed with {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def run(models: Path) -> dict[str, dict[str, str]]:
    result: dict[str, dict[str, str]] = {}
    for path in sorted(models.glob("*.tflite")):
        sig = "op" if path.stem == "scalar_only" else "train"
        result[path.stem] = {}
        for how in ("stock", "fixed"):
            done = subprocess.run([sys.executable, "-c", CHILD, str(path), sig, how], capture_output=True,
                                  text=True, timeout=600, check=False)
            result[path.stem][how] = _outcome(done.returncode)
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("build", "run"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "build":
        build(Path(argv[1]))
        return 0
    print(json.dumps(run(Path(argv[1])), sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
