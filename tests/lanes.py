"""Test lanes: which tests leave the fast lane (``make test-fast`` runs ``-m "not e2e and not slow"``).

A test is ``e2e`` when it needs a real broker process or real fedge processes. Nobody has to remember a
decorator for that; three rules apply, in this order of strength:

1. At collection, by fixture: a test whose fixture closure holds one of ``E2E_FIXTURES`` (directly or through
   other fixtures, e.g. ``fleet`` -> ``make_fleet``) is marked ``e2e``; so is every test under ``E2E_DIRS``.
   Parametrized fixtures mark their process-starting parameters (``pytest.param(..., marks=e2e)``).
2. At run time, by audit hook: a test not marked ``e2e`` that starts mosquitto or a fedge hub, agent or demo
   process fails at once with a message naming what it started and the marker it needs (nothing is started).
   ``make test`` runs every test, so a missing marker cannot slip past CI into the fast lane.
3. By hand: ``slow`` (long, in-process or not) and ``e2e`` on tests that start processes in ways rules 1-2
   cannot see at collection (a helper class, ``request.getfixturevalue``).

The markers themselves are declared once, in pyproject.toml (``--strict-markers``).
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

# Fixtures that start processes: a mosquitto broker (``mosquitto``; ``secure``: tests/devices/test_fleet_init.py's
# TLS mosquitto from the generated fleet files), the session's RabbitMQ node (``rabbitmq_node``, through
# ``rabbitmq``), hub and agent processes (``make_fleet``).
E2E_FIXTURES: frozenset[str] = frozenset({"mosquitto", "secure", "make_fleet", "rabbitmq", "rabbitmq_node"})
# Broker programs (any path to the binary): the RabbitMQ node starts its own epmd next to rabbitmq-server.
_BROKERS: frozenset[str] = frozenset({"mosquitto", "rabbitmq-server", "epmd"})
# Folders whose every test is end-to-end, relative to the repository root.
E2E_DIRS: tuple[str, ...] = ("tests/e2e",)

ROOT = Path(__file__).resolve().parent.parent

# fedge commands that run a service (a long-lived process); ``--check`` only validates a config.
_SERVICES: dict[str, tuple[tuple[str, ...], ...]] = {
    "fedge.cli": (("hub", "serve"), ("demo",)),
    "fedge.edge_agent": (("run",),),
    "fedge.edge_agent.__main__": (("run",),),
}
_SCRIPTS = {"fedge": "fedge.cli", "fedge-agent": "fedge.edge_agent"}


def started_service(argv: Sequence[str]) -> str | None:
    """What a command line starts that only an ``e2e`` test may start, or None.

    ``mosquitto``, ``rabbitmq-server`` or ``epmd`` (any path to the binary), ``fedge hub serve``, ``fedge demo``
    and ``fedge-agent run``, as console scripts or as ``python -m fedge.cli`` / ``python -m fedge.edge_agent``;
    ``--check`` runs are not services.
    """
    words = list(argv)
    if not words:
        return None
    program = os.path.basename(words[0])
    if program in _BROKERS:
        return program
    if program in _SCRIPTS:
        module, rest = _SCRIPTS[program], words[1:]
    elif "-m" in words[1:]:
        at = words.index("-m", 1)
        module, rest = (words[at + 1], words[at + 2:]) if at + 1 < len(words) else ("", [])
    else:
        return None
    if "--check" in rest:
        return None
    command = tuple(w for w in rest if not w.startswith("-"))
    for service in _SERVICES.get(module, ()):
        if command[: len(service)] == service:
            return " ".join(("fedge-agent" if module.startswith("fedge.edge_agent") else "fedge", *service))
    return None


def lane_markers(fixturenames: Iterable[str], path: Path) -> set[str]:
    """The markers rule 1 adds to a test with these fixtures (its whole closure) in this file."""
    try:
        rel = path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        rel = ""
    in_e2e_dir = any(rel == d or rel.startswith(d + "/") for d in E2E_DIRS)
    return {"e2e"} if in_e2e_dir or E2E_FIXTURES.intersection(fixturenames) else set()


def classify(items: Iterable[pytest.Item]) -> None:
    """Rule 1: add the lane markers to collected items."""
    for item in items:
        for name in sorted(lane_markers(getattr(item, "fixturenames", ()), item.path)):
            if item.get_closest_marker(name) is None:
                item.add_marker(name)


# Rule 2. The running tests (a stack: pytester runs sessions inside a test) and what they started unmarked.
_running: list[pytest.Item] = []
_violations: dict[str, str] = {}
_hook_installed = False


class LaneError(RuntimeError):
    """A test outside the ``e2e`` lane started a broker or fedge service process."""


def _command(executable: Any, args: Any) -> list[str]:
    """The argv of a ``subprocess.Popen`` audit event: ``args`` is a sequence, or one string (``shell=True``)."""
    if isinstance(args, (str, bytes, os.PathLike)):
        return shlex.split(os.fsdecode(args))
    words = [os.fsdecode(a) for a in args]
    if executable is not None and words:
        words[0] = os.fsdecode(executable)  # args[0] is then only the name the program sees
    return words


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event != "subprocess.Popen" or not _running:
        return
    item = _running[-1]
    if item.get_closest_marker("e2e") is not None:
        return
    what = started_service(_command(args[0], args[1]))
    if what is None:
        return
    message = (f"{item.nodeid} starts {what} but is not marked e2e, so it would run in the fast lane: use the "
               "mosquitto, rabbitmq or make_fleet fixture, or mark it @pytest.mark.e2e (see tests/lanes.py)")
    _violations[item.nodeid] = message
    raise LaneError(message)


def install_guard() -> None:
    """Rule 2: install the audit hook, once per process (audit hooks cannot be removed)."""
    global _hook_installed
    if not _hook_installed:
        sys.addaudithook(_audit)
        _hook_installed = True


@contextmanager
def running(item: pytest.Item) -> Iterator[None]:
    """Around a test's whole run protocol (setup, call, teardown): the audit hook checks this test."""
    _running.append(item)
    try:
        yield
    finally:
        _running.pop()
        _violations.pop(item.nodeid, None)


def check(item: pytest.Item) -> None:
    """After the test body: fail a test that started a service unmarked, even if it caught the LaneError."""
    message = _violations.pop(item.nodeid, None)
    if message is not None:
        pytest.fail(message, pytrace=False)


__all__ = ["E2E_DIRS", "E2E_FIXTURES", "LaneError", "check", "classify", "install_guard", "lane_markers", "running",
           "started_service"]
