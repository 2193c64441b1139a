"""Which training back-ends work on this device: probed once per installed model and runtime set, in child processes.

``BackendHealth(state_dir / "backends.json", configured)`` keeps one :class:`~fedge.runtime.trainers.probe.Verdict`
per installed back-end for the artifacts last probed. ``ensure(folder)`` probes every installed back-end (each in
its own worker process, all at once: a segfault or a hang there costs a verdict, not the agent) when the artifacts
or the installed runtimes changed since the last probe (:func:`probe_key`), else returns the stored verdicts.
``choose(folder)`` is the back-end a round trains with: the configured one when it works, with ``auto`` the first
that works in auto order (litert, ort, numpy); none raises :class:`~fedge.protocol.errors.TrainerCrash` with every
reason. ``mark(backend, reason)`` records a back-end that crashed during a round (until the next probe key).
``faults()`` (back-end -> reason) is what the device's presence carries (``backend_faults``, PROTOCOL.md).
The file is written atomically, private (0600) like the rest of the state folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fedge.protocol.errors import TrainerCrash
from fedge.protocol.fsio import write_atomic
from fedge.runtime.trainers.probe import Verdict, probe_backend

__all__ = ["RUNTIME_DISTRIBUTIONS", "BackendHealth", "probe_key"]

log = logging.getLogger("fedge.agent")
RUNTIME_DISTRIBUTIONS = ("fedge", "ai-edge-litert", "tflite-runtime", "onnxruntime", "onnxruntime-training-cpu",
                         "numpy")
"""Installed distributions whose versions are part of the probe key: upgrading a runtime probes again."""
Probe = Callable[[Path, str], Verdict]


def probe_key(folder: Path) -> str:
    """The artifacts (their manifest, which holds every file's sha256) and the installed runtimes' versions."""
    from importlib import metadata

    h = hashlib.sha256((folder / "manifest.json").read_bytes())
    for dist in RUNTIME_DISTRIBUTIONS:
        try:
            h.update(f"{dist}={metadata.version(dist)}\n".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist}=-\n".encode())
    return h.hexdigest()


class BackendHealth:
    """See the module docstring. Thread-safe: probes run one at a time; ``choose`` waits for a probe under way."""

    def __init__(self, path: Path, configured: str, probe: Probe | None = None,
                 on_change: Callable[[], None] | None = None) -> None:
        self.path = path
        self.configured = configured
        self._probe: Probe = probe or (lambda folder, backend: probe_backend(folder, backend))
        self._on_change = on_change
        self._lock = threading.RLock()
        self._key: str | None = None
        self._verdicts: dict[str, Verdict] = {}
        self._load()

    # ----------------------------------------------------------------- queries
    def faults(self) -> dict[str, str]:
        """Back-end -> why it is unusable (for the presence), for the artifacts probed last."""
        with self._lock:
            return {name: v.reason or "unusable" for name, v in self._verdicts.items() if not v.ok}

    def verdicts(self) -> dict[str, Verdict]:
        with self._lock:
            return dict(self._verdicts)

    # ----------------------------------------------------------------- probing
    def ensure(self, folder: Path) -> dict[str, Verdict]:
        """The verdicts for the artifacts in ``folder``, probing first when they (or the runtimes) changed."""
        from fedge.runtime.trainers import available_backends

        key = probe_key(folder)
        with self._lock:
            if key == self._key:
                return dict(self._verdicts)
            names = available_backends()
            with ThreadPoolExecutor(max_workers=max(1, len(names)), thread_name_prefix="fedge-probe") as pool:
                found = list(pool.map(lambda backend: self._probe(folder, backend), names))  # worker processes
            verdicts: dict[str, Verdict] = {}
            for backend, verdict in zip(names, found, strict=True):
                verdicts[backend] = verdict
                if verdict.ok:
                    log.info("back-end %s works here (probed in %.1f s)", backend, verdict.seconds)
                else:
                    log.warning("back-end %s is unusable here: %s", backend, verdict.reason)
            changed = self.faults() != {n: v.reason or "unusable" for n, v in verdicts.items() if not v.ok}
            self._key, self._verdicts = key, verdicts
            self._save()
        if changed and self._on_change is not None:
            self._on_change()
        return dict(verdicts)

    def ensure_async(self, folder: Path) -> threading.Thread:
        """``ensure(folder)`` in a background thread (the agent's start and a new install do not wait for it)."""

        def run() -> None:
            try:
                self.ensure(folder)
            except Exception:  # a probe that cannot even start is logged; rounds probe again when they need it
                log.exception("probing the back-ends for %s failed", folder)

        t = threading.Thread(target=run, name="fedge-probe", daemon=True)
        t.start()
        return t

    def choose(self, folder: Path) -> str:
        """The back-end to train with over ``folder`` (see the module docstring)."""
        verdicts = self.ensure(folder)
        if self.configured != "auto":
            v = verdicts.get(self.configured)
            if v is None:
                raise TrainerCrash(self.configured, "not installed on this device")
            if not v.ok:
                raise TrainerCrash(self.configured, v.reason or "unusable")
            return self.configured
        from fedge.runtime.trainers import available_backends

        for name in available_backends():  # auto order (the stored verdicts are in name order)
            v = verdicts.get(name)
            if v is not None and v.ok:
                return name
        why = "; ".join(f"{n}: {v.reason}" for n, v in verdicts.items()) or "no back-end installed"
        raise TrainerCrash("auto", f"no back-end works ({why})")

    def mark(self, backend: str, reason: str) -> None:
        """A back-end crashed, hung or failed during a round: unusable until the artifacts or runtimes change."""
        with self._lock:
            self._verdicts[backend] = Verdict(backend, False, reason)
            self._save()
        log.warning("back-end %s marked unusable: %s", backend, reason)
        if self._on_change is not None:
            self._on_change()

    # ----------------------------------------------------------------- persistence
    def _save(self) -> None:
        verdicts = {n: v.to_json() for n, v in self._verdicts.items()}
        doc = {"key": self._key, "checked": time.time(), "verdicts": verdicts}
        write_atomic(self.path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())

    def _load(self) -> None:
        try:
            doc: Any = json.loads(self.path.read_text(encoding="utf-8"))
            verdicts = {str(n): Verdict(str(n), bool(v["ok"]), v.get("reason"), float(v.get("seconds", 0.0)))
                        for n, v in doc["verdicts"].items()}
            key = doc["key"]
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("%s unreadable (%s): the back-ends are probed again", self.path, exc)
            return
        self._key = key if isinstance(key, str) else None
        self._verdicts = verdicts
