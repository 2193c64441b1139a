"""Shared fixtures: brokers. Keep this file to broker fixtures, generic helpers (see tests/helpers.py) and the
test-lane hooks (the rules are in tests/lanes.py: which tests are ``e2e`` and leave ``make test-fast``).

Other test modules import the helpers as ``from tests.helpers import free_port, wait_until``: the
repository root is put on ``sys.path`` here (``tests`` is a namespace package, no ``__init__.py``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from fedge.hub.rabbitmq import RabbitMQ  # noqa: E402
from fedge.protocol.mqtt_config import BrokerConfig  # noqa: E402
from tests import lanes  # noqa: E402
from tests.helpers import Mosquitto, free_port  # noqa: E402

pytest_plugins = ["pytester"]  # tests/layout/test_lanes.py plants tests and collects them


def pytest_configure(config: pytest.Config) -> None:
    lanes.install_guard()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    lanes.classify(items)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    with lanes.running(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    result = yield
    lanes.check(item)
    return result


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh mosquitto process (``.url``, ``.port``, ``.kind``, ``.restart()``, ``.stop()``), persistence in tmp."""
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


RABBITMQ_VHOSTS = 40
"""Virtual hosts created on the session's RabbitMQ node: one per test that asks for ``rabbitmq``."""
_rabbit_vhosts = iter(f"t{i:03d}" for i in range(RABBITMQ_VHOSTS))


@pytest.fixture(scope="session")
def rabbitmq_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQ]:
    """ONE private RabbitMQ node (MQTT plugin, free ports, generated config; ``make system-deps`` installs Debian's
    rabbitmq-server) for the whole session: starting one costs ~10 s. Tests use it through ``rabbitmq``."""
    node = RabbitMQ(tmp_path_factory.mktemp("rabbitmq"), vhosts=[f"t{i:03d}" for i in range(RABBITMQ_VHOSTS)])
    node.start()
    try:
        yield node
    finally:
        node.stop()


class RabbitVhost:
    """A test's own broker on the session's RabbitMQ node: a fresh virtual host (sessions, queues and retained
    messages of its own). ``.url``, ``.port``, ``.kind``, ``.account()`` (the ``[broker]`` table every fedge client
    must log in with: RabbitMQ authenticates every user name it is given), ``.config(**kw)``; ``.restart()`` and
    ``.stop()``/``.start()`` act on the whole node (every virtual host keeps its state)."""

    kind = "rabbitmq"

    def __init__(self, node: RabbitMQ, vhost: str) -> None:
        self.node, self.vhost = node, vhost
        self.url, self.port = node.url, node.port

    def account(self) -> dict[str, str]:
        return self.node.account(self.vhost)

    def config(self, **kw: Any) -> BrokerConfig:
        return BrokerConfig.from_mapping({**self.account(), **kw})

    def restart(self) -> None:
        self.node.restart()
        self.node.wait_ready(self.vhost)

    def stop(self) -> None:
        self.node.stop_node()

    def start(self) -> None:
        self.node.start()
        self.node.wait_ready(self.vhost)


@pytest.fixture
def rabbitmq(rabbitmq_node: RabbitMQ) -> Iterator[RabbitVhost]:
    """A RabbitMQ broker of the test's own (a fresh virtual host on the session's node); the node runs again after
    the test whatever the test did to it."""
    try:
        vhost = next(_rabbit_vhosts)
    except StopIteration:
        pytest.fail(f"more than {RABBITMQ_VHOSTS} tests use rabbitmq: raise RABBITMQ_VHOSTS in tests/conftest.py")
    rabbitmq_node.wait_ready(vhost)
    try:
        yield RabbitVhost(rabbitmq_node, vhost)
    finally:
        rabbitmq_node.start()  # a no-op when it runs


@pytest.fixture
def embedded_broker() -> Iterator[Any]:
    """A fresh amqtt ``hub.broker.EmbeddedBroker`` (MQTT 3.1.1 only) on a free port; ``.kind == "embedded"``."""
    from fedge.hub.broker import EmbeddedBroker  # lazy: the agent-only venv has no amqtt

    broker = EmbeddedBroker(port=free_port())
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(params=[pytest.param("mosquitto", marks=pytest.mark.e2e), "embedded",
                        pytest.param("rabbitmq", marks=pytest.mark.e2e)])
def broker(request: pytest.FixtureRequest) -> Any:
    """Parametrized over the three brokers for integration tests; ``broker.kind`` says which one runs."""
    return request.getfixturevalue({"embedded": "embedded_broker"}.get(request.param, request.param))


# Exported once per session for the agent and agent-loop suites; FEDGE_ARTIFACTS points the
# agent-only venv (no TensorFlow) at artifacts exported in the full venv.
@pytest.fixture(scope="session")
def artifacts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("FEDGE_ARTIFACTS")
    if env:
        d = Path(env)
        assert (d / "manifest.json").is_file(), f"FEDGE_ARTIFACTS={env} has no manifest.json"
        return d
    from fedge.export.testing import export_small

    d = tmp_path_factory.mktemp("artifacts") / "cnn28"
    export_small(d, model="cnn28")
    return d


def _mobilenet(tmp_path_factory: pytest.TempPathFactory, env: str, quantize: str | None) -> tuple[Path, str]:
    """A Keras MobileNetV2 (alpha 0.35, 96x96x3, weights=None, Dense head) exported through ``fedge export``
    (its printed verification returned too), or ``$env`` (CI's agent-only venv: exported in the full one)."""
    given = os.environ.get(env)
    if given:
        d = Path(given)
        assert (d / "manifest.json").is_file(), f"{env}={given} has no manifest.json"
        return d, ""
    import contextlib
    import io

    from fedge.export.testing import export_mobilenet

    d = tmp_path_factory.mktemp("mobilenet") / (quantize or "float")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        export_mobilenet(d, quantize=quantize, report=print)
    return d, printed.getvalue()


@pytest.fixture(scope="session")
def mobilenet_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return _mobilenet(tmp_path_factory, "FEDGE_MOBILENET_ARTIFACTS", None)


@pytest.fixture(scope="session")
def mobilenet_int8_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return _mobilenet(tmp_path_factory, "FEDGE_MOBILENET_INT8_ARTIFACTS", "int8")
