"""Loading ``model.tflite`` with LiteRT (``ai_edge_litert``), falling back to ``tflite_runtime``."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedge.core.trainer import pad_rows
from fedge.protocol.errors import ArtifactError, ConfigError
from fedge.runtime.native_log import native_notices_hidden

__all__ = ["BACKBONE_TFLITE", "FixedShapeRunner", "LiteRTModel", "litert_available"]

#: The quantised features-only backbone of a ``--quantize`` export (``model.tflite`` then has no ``features``).
BACKBONE_TFLITE = "backbone.tflite"

_MODULES = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter")


def litert_available() -> bool:
    """True when a LiteRT interpreter package is installed (nothing is imported)."""
    return any(importlib.util.find_spec(m.split(".")[0]) is not None for m in _MODULES)


def _interpreter_class() -> Any:
    for mod in _MODULES:
        if importlib.util.find_spec(mod.split(".")[0]) is None:
            continue
        return importlib.import_module(mod).Interpreter
    raise ConfigError("backend", "litert is not installed: pip install ai-edge-litert (or tflite-runtime)")


class FixedShapeRunner:
    """A signature runner for inputs whose shapes never change (fedge's signatures have a fixed batch).

    LiteRT's ``SignatureRunner.__call__`` resizes every input to the shape of the value given and re-plans the
    subgraph's memory on every call. This runner never resizes: the first call allocates the subgraph's tensors
    at the shapes the model declares, and every call only copies the inputs in, invokes and reads the outputs.
    A wrong shape still raises (``SetTensor`` checks it).

    Never resizing is also what makes training work on aarch64: ai-edge-litert 2.3.0's aarch64 build crashes
    (SIGSEGV) when an input is resized to rank 0, as ``SignatureRunner.__call__`` does for the scalar ``lr`` of
    ``train_head``: its ``InterpreterWrapper::ResizeInputTensor`` builds ``std::vector<int>(0)`` with machine code
    that writes the first element and then ``memset``s ``4 * n - 4`` bytes without checking ``n > 0`` (the x86_64
    build of the same release checks it). See docs/AARCH64.md. Runners without the internals used here (another
    LiteRT release) are called the ordinary way.
    """

    _INTERNALS = ("_interpreter_wrapper", "_inputs", "_outputs", "_subgraph_index")

    def __init__(self, runner: Any) -> None:
        self._runner = runner
        self._fast = all(hasattr(runner, a) for a in self._INTERNALS)
        self._allocated = False

    def __call__(self, **inputs: NDArray[Any]) -> dict[str, NDArray[Any]]:
        if not self._fast:
            if self._allocated:
                out: dict[str, NDArray[Any]] = self._runner(**inputs)
            else:  # the first call allocates the tensors: LiteRT logs its XNNPACK delegate notice then
                with native_notices_hidden():
                    out = self._runner(**inputs)
                self._allocated = True
            return out
        r = self._runner
        wrapper, graph = r._interpreter_wrapper, r._subgraph_index
        if inputs.keys() != r._inputs.keys():
            raise ValueError(f"inputs {sorted(inputs)} do not match the signature's {sorted(r._inputs)}")
        if not self._allocated:
            with native_notices_hidden():  # LiteRT logs its XNNPACK delegate notice here
                wrapper.AllocateTensors(graph)  # at the declared shapes: no ResizeInputTensor (class docstring)
            self._allocated = True
        for name, value in inputs.items():
            wrapper.SetTensor(r._inputs[name], value, graph)
        wrapper.Invoke(graph)
        return {name: wrapper.GetTensor(index, graph) for name, index in r._outputs}

    def get_input_details(self) -> Any:
        return self._runner.get_input_details()

    def get_output_details(self) -> Any:
        return self._runner.get_output_details()


class LiteRTModel:
    """One interpreter over ``model.tflite`` with cached signature runners (they share the variables)."""

    def __init__(self, path: str | Path, num_threads: int | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"{path}: missing")
        cls = _interpreter_class()
        try:
            self.interpreter = cls(model_path=str(path), num_threads=num_threads)
            sigs = self.interpreter.get_signature_list()
        except (RuntimeError, ValueError) as exc:
            raise ArtifactError(f"{path}: cannot load the TFLite model: {exc}") from exc
        self.signatures: dict[str, Any] = sigs
        self._runners: dict[str, Any] = {}
        self.path = path

    def runner(self, name: str) -> Any:
        r = self._runners.get(name)
        if r is None:
            if name not in self.signatures:
                raise ArtifactError(f"{self.path}: no signature {name!r} (has {sorted(self.signatures)})")
            r = FixedShapeRunner(self.interpreter.get_signature_runner(name))
            self._runners[name] = r
        return r

    def batch_size(self) -> int:
        """The fixed batch size B of the ``features`` signature."""
        details = self.runner("features").get_input_details()
        (only,) = details.values()
        return int(only["shape"][0])

    def features(self, x: NDArray[np.float32], batch: int) -> NDArray[np.float32]:
        """Run the fixed-batch ``features`` signature over any number of rows."""
        run = self.runner("features")
        (in_name,) = self.signatures["features"]["inputs"]
        x = np.asarray(x, dtype=np.float32)
        n = x.shape[0]
        chunks: list[NDArray[np.float32]] = []
        for s in range(0, n, batch):
            part = x[s : s + batch]
            out = run(**{in_name: pad_rows(part, batch)})["features"]
            chunks.append(np.array(out[: part.shape[0]], dtype=np.float32))
        if not chunks:
            shape = [int(d) for d in self.runner("features").get_output_details()["features"]["shape"][1:]]
            return np.zeros((0, *shape), dtype=np.float32)
        return np.concatenate(chunks, axis=0)
