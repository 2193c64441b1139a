"""Native libraries' start-up notices kept off the terminal (TensorFlow, absl, LiteRT).

Some INFO notices are written straight to file descriptor 2 by C++ code that no Python switch reaches:
TensorFlow 2.21 logs "oneDNN custom operations are on" from its libraries' static initialisers, through absl
before absl logging is initialised (so ``TF_CPP_MIN_LOG_LEVEL`` does not apply, and absl first prints "All log
messages before absl::InitializeLog() is called are written to STDERR"); LiteRT logs "Created TensorFlow Lite
XNNPACK delegate for CPU." at INFO with no API to raise its level.

:func:`native_notices_hidden` runs a block with fd 2 captured in a temporary file and writes back every line that
is not one of those notices: warnings and errors still reach stderr, in order, once the block ends. It does
nothing when ``TF_CPP_MIN_LOG_LEVEL=0`` (TensorFlow's own switch for INFO logs: ``fedge -v`` sets it).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

__all__ = ["drop_notices", "native_notices_hidden", "notices_hidden"]

# absl's pre-initialisation banner, absl/glog INFO lines ("I0000 00:00:1796647525.994115   14979 port.cc:153] ...":
# before absl is initialised the time is seconds since the epoch)
# and TFLite's minimal-logger INFO lines ("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.").
_NOTICE = re.compile(
    rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR\r?\n?"
    rb"|I\d{4} [\d:.]+ +\d+ [\w.-]+:\d+\] .*\n?"
    rb"|INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.\r?\n?"
)

_lock = threading.RLock()  # fd 2 is one per process: one capture at a time (re-entrant for nested blocks)


def notices_hidden() -> bool:
    """False only when ``TF_CPP_MIN_LOG_LEVEL`` is 0: the user asked for native INFO logs."""
    return os.environ.get("TF_CPP_MIN_LOG_LEVEL", "").strip() != "0"


def drop_notices(data: bytes) -> bytes:
    """``data`` without the lines that are native start-up notices (every other line kept, byte for byte)."""
    return b"".join(line for line in data.splitlines(keepends=True) if not _NOTICE.fullmatch(line))


def _flush_stderr() -> None:
    with suppress(AttributeError, OSError, ValueError):  # no stderr, or a closed one
        sys.stderr.flush()


@contextmanager
def native_notices_hidden() -> Iterator[None]:
    """Run the block with fd 2 captured; afterwards write back what it wrote there, notices dropped.

    Other threads' stderr output during the block is delayed until its end, never lost.
    """
    if not notices_hidden():
        yield
        return
    with _lock:
        _flush_stderr()
        try:
            saved = os.dup(2)
        except OSError:  # no fd 2 (a daemon with closed descriptors): nothing to keep clean
            yield
            return
        try:
            with tempfile.TemporaryFile() as capture:
                os.dup2(capture.fileno(), 2)
                try:
                    yield
                finally:
                    _flush_stderr()
                    os.dup2(saved, 2)
                    capture.seek(0)
                    kept = memoryview(drop_notices(capture.read()))
                    while kept:
                        kept = kept[os.write(2, kept):]
        finally:
            os.close(saved)
