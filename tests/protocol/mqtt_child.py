"""A child process for transport tests: connects, subscribes, reports on stdout, blocks in its handler.

Usage: python mqtt_child.py URL PROTOCOL CLIENT_ID WILL_TOPIC SUB_FILTER [USERNAME PASSWORD]
The test kills it with SIGKILL to simulate a device that loses power.
"""

from __future__ import annotations

import sys
import threading

from fedge.protocol.mqtt_config import BrokerConfig
from fedge.protocol.transport_mqtt import MqttTransport


def main() -> None:
    url, protocol, client_id, will_topic, sub_filter = sys.argv[1:6]
    username, password = (sys.argv[6], sys.argv[7]) if len(sys.argv) > 7 else (None, None)
    transport = MqttTransport(
        BrokerConfig(url=url, protocol=protocol, username=username, password=password), client_id,
        will=(will_topic, b"offline", True), manual_ack=True
    )
    block = threading.Event()

    def handler(topic: str, payload: bytes) -> None:
        print(f"got {topic} {payload.decode()}", flush=True)
        block.wait()  # never returns: the message is never acknowledged

    transport.subscribe(sub_filter, handler)
    transport.connect()
    print("ready", flush=True)
    block.wait()


if __name__ == "__main__":
    main()
