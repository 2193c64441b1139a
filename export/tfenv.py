"""TensorFlow imported once, quietly: every TensorFlow/Keras import in ``fedge.export`` calls
:func:`import_tensorflow` first.

Before the import: ``TF_CPP_MIN_LOG_LEVEL`` defaults to 2 (TensorFlow's C++ INFO and WARNING logs off, errors on;
a value already set, e.g. ``0`` by ``fedge -v``, is kept). During it: the native start-up notices that no switch
reaches (oneDNN, the absl banner) are dropped from stderr (``fedge.runtime.native_log``). After it: absl's Python
logger shows errors only, unless the application configured it.
"""

from __future__ import annotations

import logging
import os
import sys

from fedge.runtime.native_log import native_notices_hidden, notices_hidden

__all__ = ["import_tensorflow"]


def import_tensorflow() -> None:
    """Import TensorFlow if it is not imported yet, without its start-up notices (see the module docstring)."""
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with native_notices_hidden():
        import tensorflow  # noqa: F401
    absl = logging.getLogger("absl")
    if notices_hidden() and absl.level == logging.NOTSET:
        absl.setLevel(logging.ERROR)
