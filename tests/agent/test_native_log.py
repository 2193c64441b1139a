"""Native start-up notices (TensorFlow/absl INFO lines, LiteRT's XNNPACK notice) are dropped from stderr; every
other line written there comes through, in order."""

from __future__ import annotations

import os

import pytest

from fedge.runtime.native_log import drop_notices, native_notices_hidden

NOTICES = (
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    b"I0000 00:00:1796647525.994115   14979 port.cc:153] oneDNN custom operations are on. You may see slightly "
    b"different numerical results due to floating-point round-off errors from different computation orders.\n"
    b"I1207 12:51:10.123456    9434 cpu_feature_guard.cc:227] This TensorFlow binary is optimized.\n"
    b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"
)
KEPT = (
    b"W0000 00:00:1796648051.091393    9434 tf_tfl_flatbuffer_helpers.cc:365] Ignored output_format.\n"
    b"E0000 00:00:1796648051.091393    9434 something.cc:1] a real error\n"
    b"Traceback (most recent call last):\n"
    b"INFO: something else LiteRT says\n"
    b"a line without a newline"
)


def test_only_the_notices_are_dropped() -> None:
    notices, kept = NOTICES.splitlines(keepends=True), KEPT.splitlines(keepends=True)
    mixed = b"".join(n + k for n, k in zip(notices, kept, strict=False)) + b"".join(kept[len(notices):])
    assert drop_notices(mixed) == KEPT
    assert drop_notices(NOTICES) == b""


def test_the_block_writes_back_all_but_the_notices(capfd: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    with native_notices_hidden():
        os.write(2, NOTICES)
        os.write(2, KEPT)
        with native_notices_hidden():  # nested: the same thread may enter again
            os.write(2, NOTICES)
    assert capfd.readouterr().err.encode() == KEPT


def test_tf_cpp_min_log_level_0_lets_everything_through(capfd: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    with native_notices_hidden():
        os.write(2, NOTICES)
    assert capfd.readouterr().err.encode() == NOTICES


def test_what_the_block_raises_still_raises_and_stderr_is_restored(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ZeroDivisionError), native_notices_hidden():
        os.write(2, b"before the error\n")
        _ = 1 / 0
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "before the error\nafter\n"
