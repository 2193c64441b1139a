"""Importing TensorFlow through fedge.export and running a LiteRT model print nothing on stderr: no oneDNN notice,
no absl banner, no XNNPACK notice (issue 19, item 7). ``TF_CPP_MIN_LOG_LEVEL=0`` brings them back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROBE = """
import sys
import numpy as np
from fedge.runtime.trainers import open_trainer

if sys.argv[2] == "tf":
    from fedge.export.zoo import cnn28

    cnn28()  # the first TensorFlow import of the process, as in fedge pretrain / export and the demo
trainer = open_trainer(sys.argv[1], backend="litert")
trainer.features(np.zeros((2, 28, 28, 1), np.float32))  # LiteRT allocates: its XNNPACK delegate notice
print("done")
"""


def _probe(artifacts: Path, level: str | None, *, tensorflow: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    if level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = level
    return subprocess.run([sys.executable, "-c", PROBE, str(artifacts), "tf" if tensorflow else "litert"],
                          capture_output=True, text=True, env=env, timeout=300)


def test_tensorflow_and_litert_start_quietly(artifacts_dir: Path) -> None:
    out = _probe(artifacts_dir, None, tensorflow=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == "done\n"
    assert out.stderr == ""


def test_the_notices_come_back_with_tf_cpp_min_log_level_0(artifacts_dir: Path) -> None:
    out = _probe(artifacts_dir, "0", tensorflow=False)  # LiteRT only: TensorFlow's notices depend on the CPU
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Created TensorFlow Lite XNNPACK delegate for CPU." in out.stderr
