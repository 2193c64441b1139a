"""``/metrics``: the fleet in the Prometheus text format, computed from the store at scrape time.

A custom collector (no counters kept in the daemon): every scrape reads the store read-only, so the values
survive hub restarts and are the same as ``fedge hub status`` says.

======================================  =========  ==================================================
metric                                  type       what
======================================  =========  ==================================================
``fedge_rounds_total{status}``          counter    closed rounds by status (completed, failed_quorum, ...)
``fedge_round_open``                    gauge      1 while a round is open
``fedge_updates_total{outcome,reason}`` counter    accepted updates (reason "") and rejected messages by reason
``fedge_declines_total{reason}``        counter    rounds declined by devices, by reason
``fedge_devices_online``                gauge      devices whose last presence says online
``fedge_devices_known``                 gauge      devices the hub has ever heard from
``fedge_round_duration_seconds``        histogram  open-to-close time of the announced rounds
``fedge_model_accuracy``                gauge      the hub's held-out accuracy of the deployed model version
``fedge_privacy_epsilon_spent``         gauge      the fleet's epsilon (only when the ledger has rows)
``fedge_privacy_epsilon_budget``        gauge      the configured budget (only with a ledger and a budget)
======================================  =========  ==================================================
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from fedge.hub.dashboard.snapshot import FleetReader
from fedge.protocol.messages import RoundStatus

DURATION_BUCKETS: tuple[float, ...] = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class FleetCollector(Collector):
    """A prometheus_client collector reading the store on every ``collect()``."""

    def __init__(self, reader: FleetReader) -> None:
        self.reader = reader

    def describe(self) -> list[Metric]:
        return []  # nothing fixed to describe: collect() reads the store

    def collect(self) -> Iterator[Metric]:
        facts = self.reader.metric_facts()
        if facts is None:
            return
        rounds = CounterMetricFamily("fedge_rounds", "Closed rounds by status.", labels=["status"])
        for status in sorted({*map(str, RoundStatus), *facts.rounds_by_status}):
            rounds.add_metric([status], facts.rounds_by_status.get(status, 0))
        yield rounds
        yield GaugeMetricFamily("fedge_round_open", "1 while a round is open, else 0.",
                                value=int(facts.open_round is not None))
        updates = CounterMetricFamily("fedge_updates", "Device updates: accepted, or rejected by reason.",
                                      labels=["outcome", "reason"])
        updates.add_metric(["accepted", ""], facts.accepted_updates)
        for reason, n in sorted(facts.rejects.items()):
            updates.add_metric(["rejected", reason], n)
        yield updates
        declines = CounterMetricFamily("fedge_declines", "Rounds declined by selected devices, by reason.",
                                       labels=["reason"])
        for reason, n in sorted(facts.declines.items()):
            declines.add_metric([reason], n)
        yield declines
        yield GaugeMetricFamily("fedge_devices_online", "Devices whose last presence says online.",
                                value=facts.devices_online)
        yield GaugeMetricFamily("fedge_devices_known", "Devices the hub has heard from.", value=facts.devices_known)
        yield _histogram("fedge_round_duration_seconds", "Seconds from announce to close of the announced rounds.",
                         facts.durations)
        if facts.last_accuracy is not None:
            yield GaugeMetricFamily("fedge_model_accuracy", "Held-out accuracy of the deployed model version.",
                                    value=facts.last_accuracy)
        if facts.epsilon_spent is not None:
            yield GaugeMetricFamily("fedge_privacy_epsilon_spent", "The fleet's differential-privacy epsilon spent "
                                    "(at the configured delta).", value=facts.epsilon_spent)
            if facts.epsilon_budget is not None:
                yield GaugeMetricFamily("fedge_privacy_epsilon_budget", "The configured epsilon budget.",
                                        value=facts.epsilon_budget)


def _histogram(name: str, documentation: str, values: list[float]) -> HistogramMetricFamily:
    ordered = sorted(values)
    buckets: list[Any] = [[str(float(b)), bisect.bisect_right(ordered, b)] for b in DURATION_BUCKETS]
    buckets.append(["+Inf", len(ordered)])
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=sum(ordered))


def render(reader: FleetReader) -> tuple[bytes, str]:
    """The exposition text of one scrape and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(reader))
    return generate_latest(registry), CONTENT_TYPE_LATEST


__all__ = ["DURATION_BUCKETS", "FleetCollector", "render"]
