"""Topic names of a fleet, id validation and filter matching."""

from __future__ import annotations

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedge.protocol.errors import ConfigError
from fedge.protocol.topics import Topics, topic_matches, valid_id


def test_topic_tree_of_a_fleet() -> None:
    t = Topics("demo")
    assert t.control_round_start == "fedge/demo/control/round/start"
    assert t.announce == "fedge/demo/round/announce"
    assert t.result == "fedge/demo/round/result"
    assert t.model_head == "fedge/demo/model/head"
    assert t.model_full == "fedge/demo/model/full"
    assert t.hub_status == "fedge/demo/hub/status"
    assert t.update("dev-1") == "fedge/demo/update/dev-1"
    assert t.update_all == "fedge/demo/update/+"
    assert t.presence("dev-1") == "fedge/demo/presence/dev-1"
    assert t.presence_all == "fedge/demo/presence/+"
    assert t.ack("dev-1") == "fedge/demo/device/dev-1/ack"
    assert t.reject("dev-1") == "fedge/demo/device/dev-1/reject"
    assert t.device_inbox("dev-1") == "fedge/demo/device/dev-1/+"


def test_device_of_reads_update_and_presence_topics_only() -> None:
    t = Topics("demo")
    assert t.device_of("fedge/demo/update/dev_7") == "dev_7"
    assert t.device_of("fedge/demo/presence/dev_7") == "dev_7"
    assert t.device_of("fedge/other/update/dev_7") is None
    assert t.device_of("fedge/demo/update/dev_7/x") is None
    assert t.device_of("fedge/demo/model/head") is None
    assert t.device_of("fedge/demo/update/bad id") is None


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#", "x" * 65, "é", "a b"])
def test_ids_that_would_break_the_topic_tree_are_refused(bad: str) -> None:
    assert not valid_id(bad)
    with pytest.raises(ConfigError) as info:
        Topics(bad)
    assert info.value.field == "fleet"
    with pytest.raises(ConfigError) as info:
        Topics("ok").update(bad)
    assert info.value.field == "device"


segments = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=4)


@given(st.lists(st.sampled_from(["a", "b", "+", "#"]), min_size=1, max_size=4), segments)
def test_topic_matches_agrees_with_paho(filter_parts: list[str], topic_parts: list[str]) -> None:
    if "#" in filter_parts[:-1]:
        filter_parts = [p for p in filter_parts if p != "#"] or ["#"]
    f, t = "/".join(filter_parts), "/".join(topic_parts)
    assert topic_matches(f, t) == mqtt.topic_matches_sub(f, t)


def test_protocol_md_states_the_session_expiry_the_code_uses() -> None:
    from pathlib import Path

    from fedge.edge_agent.config import AGENT_SESSION_EXPIRY_S
    from fedge.hub.serve import HUB_SESSION_EXPIRY_S

    text = (Path(__file__).resolve().parents[2] / "PROTOCOL.md").read_text()
    assert f"the hub uses {HUB_SESSION_EXPIRY_S} s" in text
    assert f"agents\n    {AGENT_SESSION_EXPIRY_S} s" in text
