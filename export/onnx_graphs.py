"""The ONNX files of an export: the backbone from a converter, the small head graph written out here.

``keras_backbone_onnx``: the Keras backbone through tf2onnx (opset 17, IR 8, dynamic batch), input ``x``,
output ``features``. ``head_graph``: ``features [N, F] -> logits [N, C]`` written with ``onnx.helper``
(dense layers, ReLU between them; initializers named like the manifest, ``h0_kernel``, ...): the base of the
ORT training artifacts. IR version 8: ORT training's ``Optimizer`` refuses IR > 10.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from fedge.export.split import Split
from fedge.export.tfenv import import_tensorflow
from fedge.protocol.errors import ConfigError

__all__ = ["IR_VERSION", "MAX_IR_VERSION", "OPSET", "head_graph", "keras_backbone_onnx"]

OPSET = 17
IR_VERSION = 8
MAX_IR_VERSION = 10


def keras_backbone_onnx(split: Split) -> Any:
    """The Keras backbone of ``split`` as an ONNX ``ModelProto`` (``x [N, *in] -> features [N, F]``)."""
    import_tensorflow()
    import tensorflow as tf
    import tf2onnx

    backbone = split.keras_backbone
    spec = [tf.TensorSpec([None, *split.input_shape], tf.float32, name="x")]

    @tf.function(input_signature=spec)  # type: ignore[untyped-decorator]
    def fn(x: Any) -> Any:
        return {"features": backbone(x, training=False)}

    # tf2onnx logs every optimiser pass at INFO on its own logger: keep only its warnings.
    quiet = logging.getLogger("tf2onnx")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=OPSET)
    except Exception as exc:  # tf2onnx raises ValueError/RuntimeError/KeyError for ops it cannot map
        raise ConfigError("model", f"tf2onnx cannot convert the backbone to ONNX: {str(exc)[:300]}: move "
                          "--head-start before the layer it names, or replace that layer") from exc
    finally:
        quiet.setLevel(level)
    _freeze_captured_constants(proto, fn.get_concrete_function())
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = IR_VERSION
    proto.producer_name = "fedge (tf2onnx)"
    return proto


def _freeze_captured_constants(proto: Any, concrete: Any) -> None:
    """Constants a layer captured as eager tensors (e.g. an adapted Normalization's mean) come out of tf2onnx as
    graph inputs: make them initializers with the captured values."""
    from onnx import numpy_helper

    captured = {}
    for value, placeholder in zip(concrete.captured_inputs, concrete.graph.internal_captures, strict=True):
        if value.dtype.name != "resource":
            captured[placeholder.name] = np.asarray(value.numpy())
    extra = [i for i in proto.graph.input if i.name != "x"]
    for inp in extra:
        if inp.name not in captured:
            raise ConfigError("model", f"tf2onnx left an input {inp.name!r} in the backbone graph that is not a "
                              "captured constant: replace the layer that creates it")
        proto.graph.initializer.append(numpy_helper.from_array(captured[inp.name], inp.name))
        proto.graph.input.remove(inp)


def _init(inits: list[Any], name: str, arr: np.ndarray[Any, Any]) -> str:
    from onnx import numpy_helper

    inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
    return name


def head_graph(split: Split) -> Any:
    """``features [N, *features] -> logits [N, C]`` (the base of ``ort/head``).

    A conv head takes NHWC features: they are transposed to NCHW, each HWIO kernel ``h{i}_kernel`` is transposed
    to OIHW inside the graph (so the trainable initializer keeps the manifest's layout), stride-1 SAME
    convolutions with ReLU, then GlobalAveragePool and Flatten before the dense layers.
    """
    from onnx import TensorProto, checker, helper

    nodes: list[Any] = []
    inits: list[Any] = []
    f = "features"
    n = len(split.head_activations)
    if split.conv_head:
        nodes.append(helper.make_node("Transpose", [f], ["features_nchw"], name="Transpose_in", perm=[0, 3, 1, 2]))
        f = "features_nchw"
    spatial = split.conv_head
    for i, act in enumerate(split.head_activations):
        kernel = split.head[f"h{i}_kernel"]
        w = _init(inits, f"h{i}_kernel", kernel)
        b = _init(inits, f"h{i}_bias", split.head[f"h{i}_bias"])
        y = "logits" if i == n - 1 else f"h{i}_out"
        if kernel.ndim == 4:
            kh, kw = int(kernel.shape[0]), int(kernel.shape[1])
            pt, pl = (kh - 1) // 2, (kw - 1) // 2
            nodes.append(helper.make_node("Transpose", [w], [f"h{i}_oihw"], name=f"Transpose_h{i}", perm=[3, 2, 0, 1]))
            nodes.append(helper.make_node("Conv", [f, f"h{i}_oihw", b], [y], name=f"Conv_h{i}", kernel_shape=[kh, kw],
                                          pads=[pt, pl, kh - 1 - pt, kw - 1 - pl], strides=[1, 1]))
        else:
            if spatial:
                nodes.append(helper.make_node("GlobalAveragePool", [f], ["pooled"], name="GlobalAveragePool_head"))
                nodes.append(helper.make_node("Flatten", ["pooled"], ["pooled_flat"], name="Flatten_head", axis=1))
                f, spatial = "pooled_flat", False
            nodes.append(helper.make_node("Gemm", [f, w, b], [y], name=f"Gemm_h{i}"))
        if act == "relu":
            nodes.append(helper.make_node("Relu", [y], [f"h{i}_relu"], name=f"Relu_h{i}"))
            y = f"h{i}_relu"
        f = y
    inputs = [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", *split.features])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", split.num_classes])]
    graph = helper.make_graph(nodes, f"{split.name}_head", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fedge")
    model.ir_version = IR_VERSION
    checker.check_model(model)
    return model
