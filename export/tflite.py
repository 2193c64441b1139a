"""The on-device LiteRT models built from a :class:`~fedge.export.split.Split`.

``model.tflite``: a ``tf.Module`` that *calls* the Keras backbone (its variables listed explicitly: Keras 3
layers inside a ``tf.Module`` are not tracked otherwise) and holds the head as ``tf.Variable`` objects, with
the signatures devices use: ``features`` (unless the backbone ships as its own quantised file), ``train_head``,
``get_head``, ``set_head``. The batch size is fixed (a dynamic batch makes a gradient emit a Flex op). Built-in
ops only: Flex (SELECT_TF_OPS) models run in no Python runtime.

``backbone.tflite`` (``--quantize``): the frozen backbone alone, ``features`` only, post-training quantised
(``int8``: full-integer with a representative data set, float32 in and out; ``dynamic``: dynamic-range
weights). Quantising every signature of one model together fails, hence the separate file.
"""

from __future__ import annotations

import re
import tempfile
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedge.export.split import Split
from fedge.export.tfenv import import_tensorflow
from fedge.export.tflite_head import Signature, train_head_signature
from fedge.protocol.errors import ConfigError

__all__ = ["HEAD_SIGNATURES", "QUANTIZE_MODES", "convert_backbone", "convert_model"]

HEAD_SIGNATURES: tuple[str, ...] = ("train_head", "get_head", "set_head")
QUANTIZE_MODES: tuple[str, ...] = ("int8", "dynamic")


def _module(split: Split, with_head: bool, with_backbone: bool = True) -> Any:
    import_tensorflow()
    import tensorflow as tf

    class FedgeModule(tf.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(name="fedge")
            keras_backbone: Any = split.keras_backbone if with_backbone else None
            self.backbone_model: Any = keras_backbone
            self.backbone_vars = [w.value for w in keras_backbone.weights] if keras_backbone is not None else []
            names = list(split.head) if with_head else []
            self.head_names = names
            self.head_vars = [tf.Variable(split.head[n], name=n) for n in names]

        def features(self, x: Any) -> Any:
            return self.backbone_model(x, training=False)

    return FedgeModule()


def _head_io_signatures(m: Any, split: Split) -> dict[str, Signature]:
    """``get_head() -> {h0_kernel, ...}`` and ``set_head(h0_kernel=..., ...) -> {ok}``."""
    import_tensorflow()
    import tensorflow as tf

    names = m.head_names

    def get_head() -> Any:
        return {n: tf.identity(v) for n, v in zip(names, m.head_vars, strict=True)}

    def _set(*values: Any) -> Any:
        for v, new in zip(m.head_vars, values, strict=True):
            v.assign(new)
        return {"ok": tf.constant(1.0, tf.float32)}

    # set_head needs one keyword argument per head parameter: generate a function with those names.
    if not all(re.fullmatch(r"h\d+_(kernel|bias)", n) for n in names):
        raise ValueError(f"bad head parameter names {names}")
    args = ", ".join(names)
    scope: dict[str, Any] = {"_set": _set}
    exec(f"def set_head({args}):\n    return _set({args})\n", scope)
    set_specs = [tf.TensorSpec(split.head[n].shape, tf.float32, name=n) for n in names]
    return {"get_head": (get_head, []), "set_head": (scope["set_head"], set_specs)}


def _features_signature(m: Any, split: Split, batch: int) -> Signature:
    import_tensorflow()
    import tensorflow as tf

    def features(x: Any) -> Any:
        return {"features": m.features(x)}

    return features, [tf.TensorSpec([batch, *split.input_shape], tf.float32, name="x")]


def _offending_ops(message: str) -> list[str]:
    ops = re.findall(r"\btf\.([A-Z]\w*)", message) + re.findall(r"\bFlex(\w+)", message)
    return sorted(set(ops))


def _offending_layers(message: str, split: Split) -> list[str]:
    """Backbone layers named in the converter's op locations (``.../<layer>_1/<Op>@...``)."""
    if split.keras_backbone is None:
        return []
    parts = set(re.findall(r"/([A-Za-z0-9_.-]+?)(?:_\d+)?/[A-Z]\w*@", message))
    return [layer.name for layer in split.keras_backbone.layers
            if layer.name in parts and type(layer).__name__ != "InputLayer"]


def _conversion_error(exc: Exception, split: Split, what: str) -> ConfigError:
    """Name the ops (and the backbone layers they come from) the LiteRT converter refused."""
    text = str(exc)
    ops = _offending_ops(text)
    layers = _offending_layers(text, split)
    where = f" in layer {', '.join(repr(n) for n in layers)}" if layers else ""
    if ops:
        found = f"op {', '.join(ops)}{where}"
    else:
        found = f"the backbone{where} ({text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__})"
    return ConfigError("model", f"LiteRT cannot convert {found} to {what} with built-in ops: replace that layer "
                       "with one LiteRT converts with built-in ops, or move --head-start so that the layer is not in "
                       "the backbone")


def _convert(m: Any, signatures: dict[str, Signature], split: Split, what: str,
             configure: Callable[[Any], None] | None = None) -> bytes:
    import_tensorflow()
    import tensorflow as tf

    concrete = {key: tf.function(fn, input_signature=sig).get_concrete_function()
                for key, (fn, sig) in signatures.items()}
    with tempfile.TemporaryDirectory(prefix="fedge-savedmodel-") as tmp:
        tf.saved_model.save(m, tmp, signatures=concrete)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=list(signatures))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = True
        if configure is not None:
            configure(converter)
        try:
            with warnings.catch_warnings():  # the int8 calibrator runs TF's own (deprecated) tf.lite.Interpreter
                warnings.filterwarnings("ignore", message=r"(?s).*tf\.lite\.Interpreter is deprecated")
                data: bytes = converter.convert()
        except Exception as exc:  # ConverterError, ValueError, ...: all mean "this graph does not convert"
            raise _conversion_error(exc, split, what) from exc
    return data


def convert_model(split: Split, batch: int, with_features: bool = True) -> bytes:
    """``model.tflite``: ``features`` (when ``with_features``), ``train_head``, ``get_head``, ``set_head``."""
    m = _module(split, with_head=True, with_backbone=with_features)
    signatures = {"train_head": train_head_signature(m, split, batch), **_head_io_signatures(m, split)}
    if with_features:
        signatures["features"] = _features_signature(m, split, batch)
    return _convert(m, signatures, split, "model.tflite")


def _calibration_batches(x: NDArray[np.float32], batch: int, limit: int = 256) -> Iterator[dict[str, Any]]:
    rows = x[:limit]
    for s in range(0, len(rows), batch):
        part = rows[s : s + batch]
        if len(part) < batch:  # repeat rows to fill the fixed batch (zero rows would skew the ranges)
            part = np.resize(part, (batch, *part.shape[1:]))
        yield {"x": np.ascontiguousarray(part, dtype=np.float32)}


def convert_backbone(split: Split, batch: int, mode: str, calibration: NDArray[np.float32] | None) -> bytes:
    """``backbone.tflite``: the ``features`` signature alone, quantised (``mode``: int8 or dynamic)."""
    import_tensorflow()
    import tensorflow as tf

    if mode not in QUANTIZE_MODES:
        raise ConfigError("quantize", f"unknown mode {mode!r} (choose {', '.join(QUANTIZE_MODES)})")
    if mode == "int8" and (calibration is None or len(calibration) == 0):
        raise ConfigError("calibration", "--quantize int8 needs --calibration data.npz (an array 'x' of inputs)")
    m = _module(split, with_head=False)

    def configure(converter: Any) -> None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if mode == "int8" and calibration is not None:
            rows = calibration
            converter.representative_dataset = lambda: _calibration_batches(rows, batch)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]

    return _convert(m, {"features": _features_signature(m, split, batch)}, split, f"an {mode} backbone.tflite",
                    configure)
