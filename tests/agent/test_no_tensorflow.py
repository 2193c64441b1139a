"""The agent never needs TensorFlow, torch or onnx.

With ``FEDGE_AGENT_ENV=1`` (CI's agent-only venv) those packages must not even be installed
and the LiteRT trainer must work; otherwise (full venv) importing the agent and opening every
installed trainer must not import them (checked in a fresh interpreter).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from fedge.protocol.manifest import load_manifest
from fedge.runtime.trainers import available_backends, open_trainer

HEAVY = ("tensorflow", "torch", "onnx", "keras")

PROBE = """
import sys, json
import numpy as np
import fedge.core.training, fedge.runtime.features, fedge.edge_agent.selftest, fedge.runtime.data
from fedge.runtime.trainers import open_trainer, available_backends
for b in available_backends():
    t = open_trainer(sys.argv[1], b)
    f = t.features(np.zeros((2, *json.loads(sys.argv[2])), np.float32))
    t.train_step(f, np.zeros(2, np.int64), 0.1)
print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(json.loads(sys.argv[3])))))
"""


def test_agent_does_not_need_heavy_frameworks(artifacts_dir: Path) -> None:
    shape = load_manifest(artifacts_dir).input.shape
    if os.environ.get("FEDGE_AGENT_ENV") == "1":
        for name in ("tensorflow", "torch", "onnx"):
            assert importlib.util.find_spec(name) is None, f"{name} is installed in the agent venv"
        assert "litert" in available_backends()
        t = open_trainer(artifacts_dir)
        assert t.name == "litert"
        f = t.features(np.zeros((3, *shape), np.float32))
        assert np.isfinite(t.train_step(f, np.zeros(3, np.int64), 0.1))
    else:
        out = subprocess.run(
            [sys.executable, "-c", PROBE, str(artifacts_dir), json.dumps(list(shape)), json.dumps(HEAVY)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == []
