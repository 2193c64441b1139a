"""Logging for fedge's command-line programs: one logger family, ``fedge.*``.

Every fedge module logs to a logger under ``fedge`` (``fedge.hub``, ``fedge.agent``, ...). The command-line
entry points call :func:`configure_logging` once; it configures the ``fedge`` logger only and never touches the
root logger, so fedge embedded in another program leaves that program's logging alone.
"""

from __future__ import annotations

import logging
import sys

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _FedgeHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler installed by :func:`configure_logging` so a second call replaces it."""


def configure_logging(level: int | str = logging.INFO) -> logging.Logger:
    """Send records of the ``fedge`` family at ``level`` and above to stderr, once, and return that logger.

    Records do not propagate to the root logger (no duplicates when the host program configured it).
    """
    logger = logging.getLogger("fedge")
    logger.setLevel(level)
    for handler in [h for h in logger.handlers if isinstance(h, _FedgeHandler)]:
        logger.removeHandler(handler)
    handler = _FedgeHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    logger.addHandler(handler)
    logger.propagate = False
    return logger
