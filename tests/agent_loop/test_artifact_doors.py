"""Doors of issue 11, item 6, on the agent's artifact install: installs are named by what was verified (a forged
copy under a backbone id does not keep the genuine one out), and ONNX models with external data are refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fedge.edge_agent.artifacts import artifacts_dir as installed_dir
from fedge.edge_agent.artifacts import install_model_full, is_installed
from fedge.protocol.errors import ArtifactError
from fedge.protocol.manifest import Manifest
from fedge.protocol.messages import ModelFull
from fedge.runtime.onnx_check import onnx_external_data
from tests.agent_loop.test_agent_loop import FLEET, model_full


def _with_file(full: ModelFull, name: str, data: bytes) -> ModelFull:
    """``full`` with one file replaced and the manifest updated to match (a self-consistent forged copy)."""
    meta = json.loads(full.manifest)
    meta["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    files = {**full.files, name: np.frombuffer(data, dtype=np.uint8)}
    return ModelFull(FLEET, full.backbone_sha256, json.dumps(meta), files)


def _external_model(tmp_path: Path, inner: bool) -> bytes:
    w = numpy_helper.from_array(np.ones((4, 2), np.float32), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w])
    if inner:  # the tensor sits in a node attribute of a sub-graph (an If branch), not in the top initializers
        const = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(2, np.float32), "c"))
        branch = helper.make_graph([const], "b", [], [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2])])
        cond = helper.make_node("If", ["flag"], ["z"], then_branch=branch, else_branch=branch)
        graph.node.append(cond)
        graph.input.append(helper.make_tensor_value_info("flag", TensorProto.BOOL, []))
    model = helper.make_model(graph)
    path = tmp_path / "m.onnx"
    if inner:
        t = model.graph.node[1].attribute[0].g.node[0].attribute[0].t
        t.data_location = TensorProto.EXTERNAL
        entry = t.external_data.add()
        entry.key, entry.value = "location", "../../../etc/passwd"
        return model.SerializeToString()  # as is: onnx.save would try to write the external file
    else:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin",
                  size_threshold=0)
    return path.read_bytes()


@pytest.mark.parametrize("inner", [False, True])
def test_onnx_with_external_data_is_refused_at_install(tmp_path: Path, artifacts_dir: Path, manifest: Manifest,
                                                       inner: bool) -> None:
    assert onnx_external_data((artifacts_dir / "backbone.onnx").read_bytes()) is None  # a fedge export passes
    evil = _external_model(tmp_path, inner)
    assert onnx_external_data(evil) is not None
    full = _with_file(model_full(artifacts_dir, manifest), "backbone.onnx", evil)
    with pytest.raises(ArtifactError, match="external data"):
        install_model_full(tmp_path / "artifacts", full)
    assert not is_installed(tmp_path / "artifacts", manifest.backbone_sha256)


def test_a_forged_copy_under_a_backbone_id_does_not_keep_the_genuine_one_out(
        tmp_path: Path, artifacts_dir: Path, manifest: Manifest) -> None:
    root = tmp_path / "state" / "artifacts"
    genuine = model_full(artifacts_dir, manifest)
    forged = _with_file(genuine, "model.tflite", b"not the hub's model")
    first, new = install_model_full(root, forged)
    assert new and (first / "model.tflite").read_bytes() == b"not the hub's model"
    features = tmp_path / "state" / "features" / manifest.backbone_sha256[:16]
    features.mkdir(parents=True)
    (features / "x.npy").write_bytes(b"features of the forged backbone")

    folder, new = install_model_full(root, genuine)
    assert new and folder != first and folder == installed_dir(root, manifest.backbone_sha256)
    assert (folder / "model.tflite").read_bytes() == (artifacts_dir / "model.tflite").read_bytes()
    assert folder.name == hashlib.sha256(genuine.manifest.encode()).hexdigest()[:32]  # named by what was verified
    assert not first.exists() and not features.exists()  # the forged copy and what was computed with it are gone
    assert install_model_full(root, genuine) == (folder, False)  # retained again: nothing written
