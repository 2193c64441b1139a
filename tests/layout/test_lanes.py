"""The test lanes (tests/lanes.py) classify planted tests: a test that starts mosquitto or fedge processes ends up
``e2e`` (out of ``make test-fast``) whether or not its author wrote the marker."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

from tests.lanes import E2E_DIRS, ROOT, lane_markers, started_service

# The planted session loads the repository's real fixtures and lane hooks, and the markers of pyproject.toml.
PLANTED_CONFTEST = """
from tests.conftest import (  # noqa: F401
    broker, embedded_broker, mosquitto, pytest_collection_modifyitems, pytest_configure, pytest_runtest_call,
    pytest_runtest_protocol, rabbitmq, rabbitmq_node,
)
import pytest


@pytest.fixture
def make_fleet():  # a stand-in with the real fixture's name: classification goes by name and closure
    return None


@pytest.fixture
def fleet(make_fleet, tmp_path):  # like tests/e2e/conftest.py: reaches make_fleet only through another fixture
    return make_fleet
"""


def _plant(pytester: pytest.Pytester, **tests: str) -> None:
    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    pytester.makeini("[pytest]\naddopts = --strict-markers -p no:cacheprovider\nmarkers =\n"
                     + "".join(f"    {m}\n" for m in markers))
    pytester.makeconftest(PLANTED_CONFTEST)
    pytester.makepyfile(**tests)


def _e2e(pytester: pytest.Pytester) -> dict[str, bool]:
    items, _ = pytester.inline_genitems()
    return {item.name: item.get_closest_marker("e2e") is not None for item in items}


def test_a_planted_test_using_a_broker_fixture_is_classified_e2e(pytester: pytest.Pytester) -> None:
    _plant(pytester, test_planted="""
def test_plain(tmp_path):
    pass

def test_on_mosquitto(mosquitto):
    pass

def test_on_either_broker(broker):
    pass

def test_on_the_embedded_broker(embedded_broker):
    pass

def test_on_rabbitmq(rabbitmq):
    pass

def test_with_a_fleet(fleet):
    pass
""")
    assert _e2e(pytester) == {
        "test_plain": False,
        "test_on_mosquitto": True,
        "test_on_either_broker[mosquitto]": True,
        "test_on_either_broker[embedded]": False,  # amqtt runs in a thread of the test process
        "test_on_either_broker[rabbitmq]": True,
        "test_on_the_embedded_broker": False,
        "test_on_rabbitmq": True,  # the session's RabbitMQ node, started by the first test that needs it
        "test_with_a_fleet": True,
    }


def test_the_fast_lane_deselects_them_and_keeps_the_rest(pytester: pytest.Pytester) -> None:
    _plant(pytester, test_planted="""
import pytest

def test_plain():
    pass

def test_on_mosquitto(mosquitto):
    pass

@pytest.mark.slow
def test_long():
    pass
""")
    result = pytester.runpytest("-m", "not e2e and not slow", "--collect-only", "-q")
    assert result.ret == 0
    collected = [line for line in result.outlines if "::" in line]
    assert collected == ["test_planted.py::test_plain"]


def test_an_unmarked_test_that_starts_a_service_fails_and_starts_nothing(pytester: pytest.Pytester) -> None:
    # the programs do not exist: a run the guard let through would end in FileNotFoundError, not in LaneError
    _plant(pytester, test_planted="""
import subprocess
import pytest

MOSQUITTO = ["/nonexistent/sbin/mosquitto", "-c", "m.conf"]
DEMO = ["/nonexistent/bin/python", "-m", "fedge.cli", "demo", "--out", "x"]
AGENT = ["/nonexistent/bin/fedge-agent", "run", "--config", "agent.toml"]

@pytest.mark.parametrize("argv", [MOSQUITTO, DEMO, AGENT], ids=["mosquitto", "demo", "agent"])
def test_unmarked(argv):
    subprocess.Popen(argv)

def test_unmarked_that_swallows_the_error():
    try:
        subprocess.Popen(MOSQUITTO)
    except Exception:
        pass

@pytest.mark.e2e
def test_marked():
    with pytest.raises(FileNotFoundError):
        subprocess.Popen(MOSQUITTO)

def test_unmarked_check_run():
    with pytest.raises(FileNotFoundError):
        subprocess.Popen(["/nonexistent/bin/fedge", "hub", "serve", "--config", "h.toml", "--check"])
""")
    reports = pytester.inline_run().getreports("pytest_runtest_logreport")
    failed = {r.nodeid.split("::")[1]: str(r.longrepr) for r in reports if r.failed}
    passed = {r.nodeid.split("::")[1] for r in reports if r.passed and r.when == "call"}
    assert sorted(failed) == ["test_unmarked[agent]", "test_unmarked[demo]", "test_unmarked[mosquitto]",
                              "test_unmarked_that_swallows_the_error"]
    assert "starts mosquitto but is not marked e2e" in failed["test_unmarked[mosquitto]"]
    assert "starts fedge demo but is not marked e2e" in failed["test_unmarked[demo]"]
    assert "starts fedge-agent run but is not marked e2e" in failed["test_unmarked[agent]"]
    assert "starts mosquitto but is not marked e2e" in failed["test_unmarked_that_swallows_the_error"]
    assert passed == {"test_marked", "test_unmarked_check_run"}


@pytest.mark.parametrize(("argv", "service"), [
    (["/usr/sbin/mosquitto", "-c", "x.conf"], "mosquitto"),
    (["/usr/lib/rabbitmq/bin/rabbitmq-server"], "rabbitmq-server"),
    (["/usr/bin/epmd", "-port", "4369"], "epmd"),
    ([sys.executable, "-m", "fedge.cli", "hub", "serve", "--config", "h.toml"], "fedge hub serve"),
    ([sys.executable, "-m", "fedge.cli", "-v", "demo", "--devices", "2"], "fedge demo"),
    ([sys.executable, "-m", "fedge.edge_agent", "run", "--config", "a.toml"], "fedge-agent run"),
    (["/venv/bin/fedge", "hub", "serve"], "fedge hub serve"),
    (["fedge-agent", "run"], "fedge-agent run"),
    ([sys.executable, "-m", "fedge.cli", "hub", "serve", "--config", "h.toml", "--check"], None),
    ([sys.executable, "-m", "fedge.cli", "round", "start", "--fleet", "f"], None),
    ([sys.executable, "-m", "fedge.edge_agent.selftest", "--artifacts", "a"], None),
    (["mosquitto_passwd", "-c", "-b", "p", "u", "pw"], None),
    (["bash", "-n", "install.sh"], None),
    ([], None),
])
def test_what_counts_as_starting_a_service(argv: list[str], service: str | None) -> None:
    assert started_service(argv) == service


def test_every_test_in_the_e2e_folders_is_e2e() -> None:
    for folder in E2E_DIRS:
        assert lane_markers([], ROOT / folder / "test_anything.py") == {"e2e"}
        assert lane_markers([], ROOT / folder / "sub" / "test_anything.py") == {"e2e"}
    assert lane_markers(["tmp_path"], ROOT / "tests" / "hub" / "test_anything.py") == set()
    assert lane_markers([], Path("/elsewhere/tests/e2e/test_anything.py")) == set()
