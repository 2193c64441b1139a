"""Train-step benchmark of the edge agent (cnn28 model, head fine-tuning).

Prints (with ``--json``) ONE JSON object:

* ``litert_vs_tf_function_speedup``: head-only train step, same batch, same head: LiteRT
  ``train_head`` signature vs the same step in TensorFlow as a warmed-up ``tf.function`` (graph mode;
  the faster of plain and XLA ``jit_compile=True`` is the baseline). Target >= 10.
* ``litert_vs_tf_eager_speedup``: the same against a TF eager ``GradientTape`` step. Target >= 10.
* ``feature_cache_vs_per_round``: 3 rounds x 5 local epochs on 2,000 local samples, same LiteRT
  trainer: the agent's FeatureCache (memory + disk, cold at round 1; the disk write happens in a writer
  thread) vs an agent that computes the backbone features once per round. Target >= 2.5.
* ``feature_cache_speedup``: the same against recomputing the features every epoch. Target >= 8.
* ``agent_peak_rss_mb``: a separate process that imports only the agent (no TensorFlow), opens
  the LiteRT trainer and fine-tunes the head on the 2,000 samples; its peak RSS. Target <= 150.
* ``isolated_train_head_ms``, ``fit_isolated_s`` vs ``fit_in_process_s`` (no targets): the agent trains through a
  worker process (``IsolatedTrainer``) so that a native crash cannot take it down; what that costs per step and
  for one round's local fit (2,000 samples, 5 epochs).

plus the MobileNetV2 and int8 figures of ``bench/_mobilenet.py`` (``mobilenet_feature_ms_per_image`` <= 50,
``mobilenet_head_step_ms_max`` <= 1, ``mobilenet_agent_peak_rss_mb`` <= 150, ``mobilenet_int8_size_ratio``
<= 0.4, ``int8_top1_drop_pts`` <= 1) and the raw timings. Artifacts are exported to a temporary directory
(TensorFlow is needed in this process, never in the RSS subprocesses).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._mobilenet import int8_top1_drop, run_mobilenet  # noqa: E402
from bench._targets import TRAIN_STEP, finish  # noqa: E402
from fedge.core.trainer import Trainer  # noqa: E402
from fedge.core.training import fit  # noqa: E402
from fedge.protocol.manifest import load_head, load_manifest  # noqa: E402
from fedge.runtime.features import FeatureCache  # noqa: E402
from fedge.runtime.trainers.litert import LiteRTTrainer  # noqa: E402

LR = 0.05
REPEATS = 5

# Peak RSS from VmHWM: ru_maxrss of a process exec'd from this (TensorFlow-sized) parent would
# report the parent's high-water mark, which Linux carries across fork+exec.
RSS_CHILD = """
import json, resource, sys, time
def peak_mb():
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
import numpy as np
from fedge.runtime.data import load_local
from fedge.runtime.trainers import open_trainer
from fedge.core.training import fit
t0 = time.perf_counter()
trainer = open_trainer(sys.argv[1], "litert")
data = load_local(sys.argv[2])
feats = trainer.features(data.x)
res = fit(trainer, feats, data.y, epochs=5, lr=0.05, rng=np.random.default_rng(0))
print(json.dumps({
    "peak_rss_mb": peak_mb(),
    "tensorflow_imported": any(m.split(".")[0] in ("tensorflow", "keras", "torch") for m in sys.modules),
    "backend": trainer.name, "steps": res.steps, "loss_first": res.loss_first, "loss_last": res.loss_last,
    "seconds": time.perf_counter() - t0,
}))
"""


def local_data(n: int, rng: np.random.Generator) -> tuple[NDArray[np.float32], NDArray[np.int64], str]:
    try:
        from fedge.datasets.source import load_fashion_mnist

        ds = load_fashion_mnist()
        idx = rng.choice(len(ds.y_train), n, replace=False)
        return np.ascontiguousarray(ds.x_train[idx]), ds.y_train[idx], "fashion-mnist"
    except Exception:  # no data set on this machine: timings do not depend on the pixels
        return rng.random((n, 28, 28, 1), dtype=np.float32), rng.integers(0, 10, n), "random"


def time_litert_step(trainer: Trainer, f: NDArray[np.float32], y: NDArray[np.int64], n: int) -> float:
    for _ in range(50):
        trainer.train_step(f, y, LR)
    t0 = time.perf_counter()
    for _ in range(n):
        trainer.train_step(f, y, LR)
    return (time.perf_counter() - t0) / n


def _tf_head_step(head: dict[str, NDArray[np.float32]], f: NDArray[np.float32], y: NDArray[np.int64]
                  ) -> tuple[Any, tuple[Any, ...]]:
    """The head's SGD step in TensorFlow (same loss as the LiteRT signature) and its arguments; the caller
    runs it eagerly or compiles it with ``tf.function``."""
    import tensorflow as tf

    n_layers = len(head) // 2
    vs = [tf.Variable(head[f"h{i}_{k}"]) for i in range(n_layers) for k in ("kernel", "bias")]
    classes = int(head[f"h{n_layers - 1}_bias"].shape[0])

    def step(x: Any, onehot: Any, m: Any, rate: Any) -> Any:
        with tf.GradientTape() as tape:
            a = x
            for i in range(n_layers):
                a = tf.matmul(a, vs[2 * i]) + vs[2 * i + 1]
                if i < n_layers - 1:
                    a = tf.nn.relu(a)
            per_row = -tf.reduce_sum(onehot * tf.nn.log_softmax(a), axis=1)
            loss = tf.reduce_sum(m * per_row) / tf.maximum(tf.reduce_sum(m), 1.0)
        for v, g in zip(vs, tape.gradient(loss, vs), strict=True):
            v.assign_sub(rate * g)
        return loss

    args = (tf.constant(f), tf.one_hot(tf.constant(y.astype(np.int32)), classes), tf.ones([f.shape[0]], tf.float32),
            tf.constant(LR, tf.float32))
    return step, args


def _time_calls(step: Any, args: tuple[Any, ...], warmup: int, n: int) -> float:
    for _ in range(warmup):
        step(*args)
    t0 = time.perf_counter()
    for _ in range(n):
        step(*args)
    return (time.perf_counter() - t0) / n


def time_tf_eager_step(
    head: dict[str, NDArray[np.float32]], f: NDArray[np.float32], y: NDArray[np.int64], n: int
) -> float:
    """The step run eagerly (no ``tf.function``)."""
    step, args = _tf_head_step(head, f, y)
    return _time_calls(step, args, 20, n)


def time_tf_function_step(
    head: dict[str, NDArray[np.float32]], f: NDArray[np.float32], y: NDArray[np.int64], n: int, *, jit: bool
) -> float:
    """The same step compiled with ``tf.function`` (graph mode, optionally XLA), warmed up before timing."""
    import tensorflow as tf

    step, args = _tf_head_step(head, f, y)
    return _time_calls(tf.function(step, jit_compile=jit), args, 50, n)


def cache_rounds(
    trainer: LiteRTTrainer,
    x: NDArray[np.float32],
    y: NDArray[np.int64],
    rounds: int,
    epochs: int,
    cache_dir: Path | None,
    data_sha: str,
    backbone_sha: str,
    head0: dict[str, NDArray[np.float32]],
    per_round: bool = False,
) -> float:
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    cache = None if cache_dir is None else FeatureCache(cache_dir)  # one per agent process, as in the agent
    for _ in range(rounds):
        trainer.set_head(head0)  # a new global head every round; the backbone is unchanged
        if cache is not None:
            feats = cache.get(trainer, x, data_sha, backbone_sha)
            fit(trainer, feats, y, epochs, LR, rng)
        elif per_round:  # the realistic agent without a cache: features once per round
            fit(trainer, trainer.features(x), y, epochs, LR, rng)
        else:  # features recomputed every epoch
            for _ in range(epochs):
                fit(trainer, trainer.features(x), y, 1, LR, rng)
    elapsed = time.perf_counter() - t0
    if cache is not None:
        cache.flush()  # the entry must really reach the disk (outside the timed part: the agent does not wait)
        if not cache.path(data_sha, backbone_sha).is_file():
            raise RuntimeError("the feature cache wrote no entry")
    return elapsed


def run(samples: int, rounds: int, epochs: int) -> dict[str, Any]:
    from fedge.export.testing import export_small

    out: dict[str, Any] = {"model": "cnn28", "samples": samples, "rounds": rounds, "local_epochs": epochs}
    with tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp_s:
        tmp = Path(tmp_s)
        art = tmp / "artifacts"
        export_small(art, model="cnn28")
        m = load_manifest(art)
        head0 = load_head(art)
        rng = np.random.default_rng(0)
        trainer = LiteRTTrainer.open(art)
        b = trainer.batch_size

        # 1. head-only train step, same batch: LiteRT vs TF graph mode (tf.function, plain and XLA) and eager
        f = np.abs(rng.normal(size=(b, m.feature_dim))).astype(np.float32)
        yb = rng.integers(0, m.num_classes, b)
        trainer.set_head(head0)
        lite_s = min(time_litert_step(trainer, f, yb, 3000) for _ in range(REPEATS))
        fn_s = min(time_tf_function_step(head0, f, yb, 2000, jit=False) for _ in range(REPEATS))
        xla_s = min(time_tf_function_step(head0, f, yb, 2000, jit=True) for _ in range(REPEATS))
        tf_s = time_tf_eager_step(head0, f, yb, 300)
        out.update(
            litert_train_head_ms=round(lite_s * 1e3, 4),
            tf_function_step_ms=round(fn_s * 1e3, 4),
            tf_function_xla_step_ms=round(xla_s * 1e3, 4),
            tf_eager_step_ms=round(tf_s * 1e3, 4),
            litert_vs_tf_function_speedup=round(min(fn_s, xla_s) / lite_s, 2),
            litert_vs_tf_eager_speedup=round(tf_s / lite_s, 2),
        )

        # 2. feature cache across rounds vs recomputing features every epoch
        x, y, source = local_data(samples, rng)
        out["data"] = source
        data_sha = hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()
        bb_sha = m.backbone_sha256
        t_feat0 = time.perf_counter()
        trainer.features(x)
        out["features_2000_ms"] = round((time.perf_counter() - t_feat0) * 1e3, 2)
        no_cache = per_round = with_cache = float("inf")
        for rep in range(REPEATS):  # best of REPEATS; every with-cache run starts from an empty cache
            t_no = cache_rounds(trainer, x, y, rounds, epochs, None, data_sha, bb_sha, head0)
            t_round = cache_rounds(trainer, x, y, rounds, epochs, None, data_sha, bb_sha, head0, per_round=True)
            t_with = cache_rounds(trainer, x, y, rounds, epochs, tmp / f"cache-{rep}", data_sha, bb_sha, head0)
            no_cache, per_round, with_cache = min(no_cache, t_no), min(per_round, t_round), min(with_cache, t_with)
        out.update(
            no_cache_s=round(no_cache, 4),
            per_round_features_s=round(per_round, 4),
            with_cache_s=round(with_cache, 4),
            feature_cache_speedup=round(no_cache / with_cache, 2),
            feature_cache_vs_per_round=round(per_round / with_cache, 2),
        )

        # 3. what the agent pays for training in a worker process (IsolatedTrainer: a crash there cannot take the
        # agent down): the same step through the worker, and one round's local fit on the same samples
        from fedge.runtime.trainers.isolated import IsolatedTrainer

        feats = trainer.features(x)
        with IsolatedTrainer(art, "litert") as iso:
            iso.set_head(head0)
            iso_s = min(time_litert_step(iso, f, yb, 1000) for _ in range(REPEATS))
            fits = {}
            for name, tr in (("in_process", trainer), ("isolated", iso)):
                tr.set_head(head0)
                t0 = time.perf_counter()
                fit(tr, feats, y, epochs, LR, np.random.default_rng(0))
                fits[name] = time.perf_counter() - t0
        out.update(isolated_train_head_ms=round(iso_s * 1e3, 4), fit_in_process_s=round(fits["in_process"], 4),
                   fit_isolated_s=round(fits["isolated"], 4))

        # 4. peak RSS of an agent-only process fine-tuning the head on the same samples
        data_file = tmp / "local.npz"
        np.savez(data_file, x=x, y=y)
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run(
            [sys.executable, "-c", RSS_CHILD, str(art), str(data_file)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"RSS subprocess failed: {proc.stderr.strip()}")
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        if child["tensorflow_imported"]:
            raise RuntimeError("the agent subprocess imported TensorFlow/Keras/torch")
        out.update(
            agent_peak_rss_mb=round(child["peak_rss_mb"], 1),
            agent_fit_steps=child["steps"],
            agent_loss_first=child["loss_first"],
            agent_loss_last=child["loss_last"],
            agent_total_s=round(child["seconds"], 3),
        )

        # 4. a real backbone (MobileNetV2) float and int8, and what int8 costs in accuracy on the demo's cnn28
        out.update(run_mobilenet(tmp, RSS_CHILD))
        out.update(int8_top1_drop(tmp))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=5)
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return finish({"bench": "bench/train_step.py", **run(args.samples, args.rounds, args.epochs)}, TRAIN_STEP,
                  args.json)


if __name__ == "__main__":
    raise SystemExit(main())
