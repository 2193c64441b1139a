"""An ONNX feature extractor written the way ``torch.onnx.export`` writes one, built with ``onnx.helper``.

torch's naming (``conv1.weight``, ``bn1.running_mean``, ``/layer1/conv1/Conv``, input ``input``), NCHW, opset 17,
IR 8, a dynamic batch axis: Conv -> BatchNormalization -> Relu -> a residual block (Conv, BN, Relu, Conv, BN,
Add, Relu) -> GlobalAveragePool -> Flatten, on 3x20x20 images, 8 features. ``features_numpy`` is an
independent NumPy forward pass of the same weights (the reference the tests check the export against).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

F32 = NDArray[np.float32]
EPS = 1e-5


class TorchStyleNet:
    def __init__(self, rng: np.random.Generator, channels: int = 8) -> None:
        c = channels
        self.w: dict[str, F32] = {}

        def conv(name: str, cin: int, cout: int, bias: bool) -> None:
            self.w[f"{name}.weight"] = rng.normal(0, np.sqrt(2 / (cin * 9)), (cout, cin, 3, 3)).astype(np.float32)
            if bias:
                self.w[f"{name}.bias"] = rng.normal(0, 0.1, cout).astype(np.float32)

        def bn(name: str) -> None:
            self.w[f"{name}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
            self.w[f"{name}.bias"] = rng.normal(0, 0.2, c).astype(np.float32)
            self.w[f"{name}.running_mean"] = rng.normal(0, 0.2, c).astype(np.float32)
            self.w[f"{name}.running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)

        conv("conv1", 3, c, True)
        bn("bn1")
        conv("layer1.conv1", c, c, False)
        bn("layer1.bn1")
        conv("layer1.conv2", c, c, False)
        bn("layer1.bn2")

    # ---- NumPy reference ------------------------------------------------------------------------------------
    def _conv(self, x: F32, name: str, stride: int) -> F32:
        w = self.w[f"{name}.weight"].astype(np.float64)
        xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
        win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))[:, :, ::stride, ::stride]
        out = np.einsum("nchwij,ocij->nohw", win, w)
        if f"{name}.bias" in self.w:
            out += self.w[f"{name}.bias"][None, :, None, None]
        return out.astype(np.float32)

    def _bn(self, x: F32, name: str) -> F32:
        g, b, m, v = (self.w[f"{name}.{k}"][None, :, None, None] for k in ("weight", "bias", "running_mean",
                                                                            "running_var"))
        return ((x - m) / np.sqrt(v + EPS) * g + b).astype(np.float32)

    def features_numpy(self, x: F32) -> F32:
        h = np.maximum(self._bn(self._conv(x, "conv1", 2), "bn1"), 0)
        r = np.maximum(self._bn(self._conv(h, "layer1.conv1", 1), "layer1.bn1"), 0)
        r = self._bn(self._conv(r, "layer1.conv2", 1), "layer1.bn2")
        h = np.maximum(r + h, 0)
        return h.mean(axis=(2, 3)).astype(np.float32)

    # ---- the ONNX file --------------------------------------------------------------------------------------
    def save(self, path: Path, *, flatten: bool = True, dynamic_batch: bool = True) -> None:
        from onnx import TensorProto, helper, numpy_helper, save

        nodes: list[Any] = []

        def node(op: str, name: str, inputs: list[str], **attrs: Any) -> str:
            out = f"/{name}/{op}_output_0" if name else f"/{op}_output_0"
            nodes.append(helper.make_node(op, inputs, [out], name=f"/{name}/{op}" if name else f"/{op}", **attrs))
            return out

        def conv(x: str, name: str, stride: int) -> str:
            ins = [x, f"{name}.weight"] + ([f"{name}.bias"] if f"{name}.bias" in self.w else [])
            return node("Conv", name.replace(".", "/"), ins, kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                        strides=[stride, stride], dilations=[1, 1], group=1)

        def bn(x: str, name: str) -> str:
            return node("BatchNormalization", name.replace(".", "/"),
                        [x, *(f"{name}.{k}" for k in ("weight", "bias", "running_mean", "running_var"))],
                        epsilon=EPS, momentum=0.9)

        h = node("Relu", "relu", [bn(conv("input", "conv1", 2), "bn1")])
        r = node("Relu", "layer1/relu", [bn(conv(h, "layer1.conv1", 1), "layer1.bn1")])
        r = bn(conv(r, "layer1.conv2", 1), "layer1.bn2")
        h = node("Relu", "layer1/relu_1", [node("Add", "layer1", [r, h])])
        h = node("GlobalAveragePool", "avgpool", [h])
        if flatten:
            h = node("Flatten", "", [h], axis=1)
        nodes[-1].output[0] = "output"
        batch: Any = "batch_size" if dynamic_batch else 1
        c = self.w["bn1.weight"].shape[0]
        graph = helper.make_graph(
            nodes, "main_graph",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, 20, 20])],
            [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, c] if flatten else [batch, c, 1, 1])],
            initializer=[numpy_helper.from_array(v, k) for k, v in self.w.items()],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="pytorch",
                                  producer_version="2.13.0")
        model.ir_version = 8
        save(model, str(path))
