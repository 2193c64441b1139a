"""Less in the clear (issue 21, item 6): the operator's client takes the full result of a round from
control/round/result in preference to round/result, where devices read it without cohort or sample totals."""

from __future__ import annotations

from fedge.core.hub_round import for_devices
from fedge.hub.operator import Operator
from fedge.protocol.codec import encode
from fedge.protocol.messages import RoundResult, RoundStatus
from fedge.protocol.transport import InMemoryBroker, InMemoryTransport
from tests.hub.fleet import FLEET, TOPICS


def test_the_operator_sees_the_full_result_whatever_the_order() -> None:
    full = RoundResult(FLEET, 3, RoundStatus.COMPLETED, "v3", 0.5, 1.0, ("a", "b"), 40, 0, 1.0, declined=("c",),
                       federated={"val_n": 20.0, "val_acc_global": 0.6})
    public = for_devices(full)
    assert (public.devices, public.declined, public.n_samples, public.federated) == ((), (), 0,
                                                                                      {"val_acc_global": 0.6})
    for order in ((TOPICS.control_round_result, TOPICS.result), (TOPICS.result, TOPICS.control_round_result)):
        broker = InMemoryBroker()
        seen: list[RoundResult] = []
        op = Operator(InMemoryTransport(broker), FLEET, on_result=seen.append)
        hub = InMemoryTransport(broker)
        for topic in order:
            hub.publish(topic, encode(full if topic == TOPICS.control_round_result else public))
        assert op.result(3, 1.0).devices == ("a", "b") and op.result(3, 1.0).n_samples == 40
        assert seen[-1].devices == ("a", "b")
