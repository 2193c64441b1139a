"""The ``train_head`` signature of ``model.tflite``: one masked SGD step of the head, built-in ops only.

Kept in this one module so that another formulation of head training is a local change. The loss is returned
before the update. The backward pass is written out in closed form: ``ReluGrad``,
``sparse_softmax_cross_entropy_with_logits`` and a convolution's kernel gradient (``Conv2DBackpropFilter``)
are not built-in ops. A conv head (stride-1 SAME convolutions, then a global average pool before the dense
layers; HWIO kernels) gets its kernel gradient as one matrix product per kernel tap over shifted slices of the
padded input, and its input gradient as a VALID convolution of the padded output gradient with the flipped,
transposed kernel: PAD, STRIDED_SLICE, RESHAPE, FULLY_CONNECTED/BATCH_MATMUL, PACK and CONV_2D.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedge.export.split import Split
from fedge.export.tfenv import import_tensorflow

__all__ = ["Signature", "train_head_signature"]

Signature = tuple[Callable[..., Any], list[Any]]


def _pads(kernel_shape: tuple[int, ...]) -> list[list[int]]:
    """NHWC paddings of a stride-1 SAME convolution (the extra row/column goes last, as in TF)."""
    kh, kw = kernel_shape[0], kernel_shape[1]
    return [[0, 0], [(kh - 1) // 2, kh - 1 - (kh - 1) // 2], [(kw - 1) // 2, kw - 1 - (kw - 1) // 2], [0, 0]]


def _conv(tf: Any, a: Any, w: Any, shape: tuple[int, ...]) -> Any:
    return tf.nn.conv2d(tf.pad(a, _pads(shape)), w, strides=1, padding="VALID")


def _conv_grads(tf: Any, a: Any, w: Any, dz: Any, shape: tuple[int, ...], need_input: bool) -> tuple[Any, Any]:
    kh, kw, cin, cout = shape
    _, h, wd, _ = a.shape
    ap = tf.pad(a, _pads(shape))
    flat_dz = tf.reshape(dz, [-1, cout])
    taps = [tf.matmul(tf.reshape(ap[:, i : i + h, j : j + wd, :], [-1, cin]), flat_dz, transpose_a=True)
            for i in range(kh) for j in range(kw)]
    dw = tf.reshape(tf.stack(taps), [kh, kw, cin, cout])
    if not need_input:
        return dw, None
    pads = _pads(shape)
    flipped = tf.transpose(tf.reverse(w, axis=[0, 1]), [0, 1, 3, 2])  # [kh, kw, cout, cin]
    mirrored = [[0, 0], [pads[1][1], pads[1][0]], [pads[2][1], pads[2][0]], [0, 0]]
    da = tf.nn.conv2d(tf.pad(dz, mirrored), flipped, strides=1, padding="VALID")
    return dw, da


def train_head_signature(m: Any, split: Split, batch: int) -> Signature:
    """``train_head(f [B, *features], y int32 [B], mask f32 [B], lr f32 []) -> {loss}``."""
    import_tensorflow()
    import tensorflow as tf

    acts_spec = split.head_activations
    n_layers = len(acts_spec)
    shapes = [tuple(int(d) for d in split.head[f"h{i}_kernel"].shape) for i in range(n_layers)]

    def train_head(f: Any, y: Any, mask: Any, lr: Any) -> Any:
        inputs: list[Any] = []
        pre: list[Any] = []
        pooled: list[Any] = []
        a = f
        for i, act in enumerate(acts_spec):
            w, b = m.head_vars[2 * i], m.head_vars[2 * i + 1]
            pool = None
            if len(shapes[i]) == 4:
                z = _conv(tf, a, w, shapes[i]) + b
            else:
                if len(a.shape) == 4:  # the global average pool before the first dense layer
                    pool = a.shape
                    a = tf.reduce_mean(a, axis=[1, 2])
                z = tf.matmul(a, w) + b
            inputs.append(a)
            pre.append(z)
            pooled.append(pool)
            a = tf.nn.relu(z) if act == "relu" else z
        logits = pre[-1]
        denom = tf.maximum(tf.reduce_sum(mask), 1.0)
        onehot = tf.one_hot(y, split.num_classes, dtype=tf.float32)
        logp = tf.nn.log_softmax(logits)
        loss = tf.reduce_sum(mask * -tf.reduce_sum(onehot * logp, axis=1)) / denom
        dz = (tf.exp(logp) - onehot) * tf.reshape(mask / denom, [batch, 1])
        grads: list[Any] = [None] * len(m.head_vars)
        for i in reversed(range(n_layers)):
            w = m.head_vars[2 * i]
            if len(shapes[i]) == 4:
                grads[2 * i], da = _conv_grads(tf, inputs[i], w, dz, shapes[i], need_input=i > 0)
                grads[2 * i + 1] = tf.reduce_sum(dz, axis=[0, 1, 2])
            else:
                grads[2 * i] = tf.matmul(inputs[i], dz, transpose_a=True)
                grads[2 * i + 1] = tf.reduce_sum(dz, axis=0)
                da = tf.matmul(dz, w, transpose_b=True) if i > 0 else None
                if da is not None and pooled[i] is not None:  # back through the global average pool
                    _, h, wd, c = pooled[i]
                    da = tf.reshape(da / float(h * wd), [batch, 1, 1, c]) * tf.ones([1, h, wd, 1])
            if i > 0:
                dz = da * tf.cast(pre[i - 1] > 0, tf.float32)
        for v, g in zip(m.head_vars, grads, strict=True):
            v.assign_sub(lr * g)
        return {"loss": loss}

    specs = [tf.TensorSpec([batch, *split.features], tf.float32, name="f"),
             tf.TensorSpec([batch], tf.int32, name="y"),
             tf.TensorSpec([batch], tf.float32, name="mask"),
             tf.TensorSpec([], tf.float32, name="lr")]
    return train_head, specs
