"""Session fixture of the export tests: one cnn28 export (non-zero biases) and its Keras model."""

from __future__ import annotations

import numpy as np
import pytest

from tests.export.support import Exported, randomize


@pytest.fixture(scope="session")
def cnn28_export(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    from fedge.export.exporter import export_model
    from fedge.export.zoo import cnn28

    model = randomize(cnn28(10), np.random.default_rng(7))
    out = tmp_path_factory.mktemp("export") / "cnn28"
    manifest = export_model(model, out)
    return Exported(out, model, manifest)
