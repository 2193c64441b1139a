"""An embedded MQTT 3.1.1 broker (amqtt) running in a background thread with its own asyncio loop.

For demos, tests and small fleets; production fleets use mosquitto (or any MQTT broker).

Trap handled here: amqtt's default ``AnonymousAuthPlugin`` (``allow_anonymous: True``) marks every
session anonymous, and amqtt then silently never queues QoS 1 messages for an offline persistent
session. We configure ``allow_anonymous: False`` instead: every client that sends a username is let
in (no password check) and its persistent session does get its messages queued. A client without a
username is refused (CONNACK "bad username or password"); ``MqttTransport`` always sends one (the
configured username, else its client id).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from fedge.protocol.errors import TransportError

__all__ = ["EmbeddedBroker", "broker_config"]

_log = logging.getLogger(__name__)


def broker_config(host: str, port: int) -> dict[str, Any]:
    """The amqtt 0.12.1 configuration used by :class:`EmbeddedBroker`."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 0}},
        "plugins": {
            # allow_anonymous False: sessions with a username are not "anonymous", so QoS1 messages
            # are queued while a persistent session is offline (see the module docstring).
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": False},
        },
    }


async def _shutdown(broker: Any, writers: set[asyncio.StreamWriter], timeout_s: float) -> None:
    """Drop every connection (clients see a broker crash), shut amqtt down, cancel what it left behind."""
    for writer in list(writers):
        writer.transport.abort()
    if broker is not None:
        try:
            await asyncio.wait_for(broker.shutdown(), timeout_s)
        except Exception:
            _log.exception("amqtt shutdown failed")
            for server in getattr(broker, "_servers", {}).values():  # at least free the port
                await server.close_instance()
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0.01)  # let the transports' close callbacks run


class EmbeddedBroker:
    """amqtt in a daemon thread; ``start()`` returns once the port accepts connections."""

    kind = "embedded"

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout_s: float = 10.0) -> None:
        if self.running:
            return
        from amqtt.broker import Broker  # lazy: only the hub needs amqtt

        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        thread = threading.Thread(target=run, name=f"amqtt-{self.port}", daemon=True)
        thread.start()
        ready.wait(timeout_s)
        self._loop, self._thread = loop, thread

        writers = self._writers

        class _TrackingBroker(Broker):  # type: ignore[misc]
            """Remembers every connection so that stop() can close them (amqtt leaves some open)."""

            async def stream_connected(self, reader: Any, writer: asyncio.StreamWriter, listener_name: str) -> None:
                writers.add(writer)
                try:
                    await super().stream_connected(reader, writer, listener_name)
                finally:
                    writers.discard(writer)
                    writer.transport.abort()

        async def boot() -> Any:
            broker = _TrackingBroker(broker_config(self.host, self.port), loop=loop)
            await broker.start()
            return broker

        try:  # Broker.start() awaits asyncio.start_server: the port accepts connections when it returns
            self._broker = asyncio.run_coroutine_threadsafe(boot(), loop).result(timeout_s)
        except Exception as exc:
            self._halt_loop()
            raise TransportError(f"embedded broker could not listen on {self.host}:{self.port}: {exc}") from exc
        _log.info("embedded MQTT broker listening on %s", self.url)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Shut the broker down (sessions and retained messages are in memory and are lost)."""
        loop, broker = self._loop, self._broker
        if loop is None:
            return
        if loop.is_running():
            try:
                done = asyncio.run_coroutine_threadsafe(_shutdown(broker, self._writers, timeout_s), loop)
                done.result(timeout_s + 5)
            except Exception:  # a failing shutdown must not keep the thread alive
                _log.exception("embedded broker shutdown failed")
        self._broker = None
        self._halt_loop(timeout_s)

    def session_connected(self, client_id: str) -> bool | None:
        """Whether amqtt sees ``client_id`` connected (None: no such session).

        amqtt drops a QoS 1 message that reaches a session while its DISCONNECT is still being
        processed; tests wait on this before publishing to a client that just left.
        """
        broker = self._broker
        entry = broker._sessions.get(client_id) if broker is not None else None
        return None if entry is None else bool(entry[0].transitions.state == "connected")

    def restart(self) -> None:
        """Stop and start again on the same port (amqtt keeps sessions in memory: they are lost)."""
        self.stop()
        self.start()

    def _halt_loop(self, timeout_s: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout_s)
        self._loop = self._thread = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
