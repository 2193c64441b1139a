"""Installing a large model/full holds at most one extra copy of it in memory (issue 12, item 3).

A child process runs a real agent on an in-memory broker, reads a 50 MB model/full frame from disk and publishes
it; the agent decodes and installs it on its real path (``_guard`` -> ``decode`` -> ``_on_model_full`` ->
``install_model_full``). The child reports Python's traced allocation peak and the process's peak RSS.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from fedge.edge_agent.artifacts import artifacts_dir
from fedge.protocol.codec import encode
from fedge.protocol.manifest import Manifest
from fedge.protocol.messages import ModelFull

MB = 1 << 20
SIZE = 50 * MB

CHILD = r"""
import gc, json, sys, tracemalloc
from pathlib import Path

from fedge.edge_agent.agent import Agent
from fedge.edge_agent.artifacts import is_installed
from fedge.edge_agent.config import config_from_mapping
from fedge.protocol.topics import Topics
from fedge.protocol.transport import InMemoryBroker, InMemoryTransport

frame_path, root, data, backbone = sys.argv[1:5]

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

cfg = config_from_mapping({"device_id": "mem", "fleet": "mem", "data": data, "state_dir": "state",
                           "backend": "numpy", "broker": {"url": "mqtt://127.0.0.1:1"}}, Path(root))
broker = InMemoryBroker()
agent = Agent(cfg, transport=InMemoryTransport(broker))
agent.start()
gc.collect()
Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
base = status("VmRSS")
tracemalloc.start()
payload = Path(frame_path).read_bytes()
traced_payload = tracemalloc.get_traced_memory()[0]
tracemalloc.reset_peak()
broker.publish(Topics("mem").model_full, payload, False)
traced_peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({"base": base, "hwm": status("VmHWM"), "payload": len(payload), "traced_payload": traced_payload,
                  "traced_peak": traced_peak, "installed": is_installed(cfg.state_dir / "artifacts", backbone)}))
agent.stop()
"""


def synthetic_model_full(size: int, fleet: str = "mem", tag: bytes = b"synthetic backbone") -> ModelFull:
    """A model/full whose manifest and hashes are right (its files are random bytes: enough to install)."""
    blob = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    small = np.arange(1000, dtype=np.uint8)
    backbone = hashlib.sha256(tag).hexdigest()
    files = {"model.tflite": blob, "ort/head/checkpoint": small}
    manifest = Manifest.from_dict({
        "format": 1, "model": "synthetic", "input": {"name": "x", "shape": [4], "dtype": "float32"},
        "feature_dim": 4, "num_classes": 2, "train_batch": 8,
        "head": [{"name": "h0_kernel", "shape": [4, 2], "dtype": "float32"},
                 {"name": "h0_bias", "shape": [2], "dtype": "float32"}],
        "head_activations": ["linear"], "backbone_sha256": backbone,
        "files": {name: {"sha256": hashlib.sha256(arr).hexdigest(), "size": arr.size} for name, arr in files.items()},
    })
    return ModelFull(fleet, backbone, manifest.to_json(), files)


def test_installing_a_50_mb_model_full_holds_at_most_one_extra_copy(tmp_path: Path) -> None:
    msg = synthetic_model_full(SIZE)
    frame = tmp_path / "model_full.bin"
    frame.write_bytes(encode(msg))
    del msg
    data = tmp_path / "local.npz"
    np.savez(data, x=np.zeros((4, 4), np.float32), y=np.array([0, 1, 0, 1]))
    out = subprocess.run([sys.executable, "-c", CHILD, str(frame), str(tmp_path), str(data),
                          hashlib.sha256(b"synthetic backbone").hexdigest()],
                         capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    payload = report["payload"]
    assert payload > SIZE and report["installed"], report
    installed = artifacts_dir(tmp_path / "state" / "artifacts", hashlib.sha256(b"synthetic backbone").hexdigest())
    assert (installed / "model.tflite").stat().st_size == SIZE
    extra_traced = report["traced_peak"] - report["traced_payload"]  # allocations beyond the received frame
    extra_rss = report["hwm"] - report["base"]  # the frame itself and everything the install added
    print(f"payload {payload / MB:.1f} MB: traced extra {extra_traced / MB:.1f} MB, peak RSS extra "
          f"{extra_rss / MB:.1f} MB ({extra_rss / payload:.2f}x the payload)")
    assert extra_traced < 1.2 * payload, report  # at most one copy beyond the frame
    assert extra_rss < 2.2 * payload, report  # the frame + at most one copy
