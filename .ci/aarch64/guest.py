"""Runs inside the emulated Pi (the ``fedge-lane`` unit starts it at boot; the guest powers off when it returns).

Reads the run's payload disk (``/payload``: the fedge wheel, the agent tests, exported artifacts, local data,
``agent.toml``, the LiteRT reproducer) and writes ``/payload/results/guest.json`` plus logs:

1. install fedge from its wheel into the baked venv (offline, ``--no-deps``: every dependency is already there
   from aarch64 wheels) and ``pip check``;
2. the agent-environment tests (``tests/agent -m "not full_env"``, as ``make agent-env-tests`` runs them);
3. ``fedge-agent selftest --backend B`` for every back-end, each in its own process (a crash is a result);
   ``fedge-agent selftest --probe`` (the agent's own probe of every installed back-end);
4. the LiteRT reproducer (``repro_litert.py run``): which signature call crashes, with which runner;
5. provisioning: ``fedge devices flash`` of an ``rpi4`` bundle (made on the host by ``fedge devices provision
   --artifacts``) onto this machine, through flash's own SSH command sequence run locally (``ssh``/``scp`` become
   ``sh -c``/``cp``: the guest has no SSH server): the bundle's ``install.sh`` makes a venv, installs
   ``fedge[agent]`` from aarch64 wheels only (offline: ``PIP_FIND_LINKS``), runs ``fedge-agent selftest --probe``
   and starts the ``fedge-agent`` service, which is checked and stopped;
6. ``fedge-agent run`` against the hub on the host (10.0.2.2) until it completed the lane's rounds.

Standard library only until fedge is installed.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

PAYLOAD = Path("/payload")
OUT = PAYLOAD / "results"
VENV = Path(sys.executable).parent
AGENT_STATE = Path("/var/lib/fedge-agent")
BACKENDS = ("numpy", "litert", "ort")
ROUNDS = int((PAYLOAD / "rounds").read_text()) if (PAYLOAD / "rounds").exists() else 2
AGENT_TIMEOUT_S = 1500.0


def say(text: str) -> None:
    print(f"[fedge-lane {time.strftime('%H:%M:%S')}] {text}", flush=True)


def run(cmd: list[str], log: str, timeout: float = 1800.0, **kw: Any) -> subprocess.CompletedProcess[str]:
    t0 = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    (OUT / log).write_text(f"$ {' '.join(cmd)}\nexit {done.returncode} after {time.monotonic() - t0:.1f} s\n"
                           f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}\n")
    return done


def last_json(text: str) -> dict[str, Any]:
    lines = [ln for ln in text.splitlines() if ln.startswith("{")]
    if not lines:
        return {}
    try:
        out = json.loads(lines[-1])
    except ValueError:
        return {}
    return out if isinstance(out, dict) else {}


def exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"crashed with {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def install(res: dict[str, Any]) -> None:
    wheel = next(PAYLOAD.glob("wheels/fedge-*.whl"))
    # the venv disk is mounted read-only; QEMU keeps the writes in a throw-away overlay (the cache stays clean)
    subprocess.run(["mount", "-o", "remount,rw", "/opt/fedge"], check=True)
    t0 = time.monotonic()
    done = run([str(VENV / "pip"), "install", "-q", "--no-index", "--no-deps", "--disable-pip-version-check",
                str(wheel)], "install.log")
    res["timings"]["install_fedge_s"] = round(time.monotonic() - t0, 1)
    if done.returncode != 0:
        raise RuntimeError(f"pip install {wheel.name} failed: {done.stderr[-500:]}")
    check = run([str(VENV / "pip"), "check", "--disable-pip-version-check"], "pip-check.log")
    res["pip_check"] = "ok" if check.returncode == 0 else check.stdout.strip()[-500:]


def agent_tests(res: dict[str, Any]) -> None:
    t0 = time.monotonic()
    env = {**os.environ, "FEDGE_AGENT_ENV": "1", "FEDGE_ARTIFACTS": str(PAYLOAD / "artifacts"),
           "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/root"}
    done = run([str(VENV / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/agent", "-m",
                "not full_env", f"--junitxml={OUT / 'agent-tests.xml'}"], "agent-tests.log", cwd=PAYLOAD, env=env)
    summary: dict[str, Any] = {"exit": done.returncode, "seconds": round(time.monotonic() - t0, 1)}
    xml = OUT / "agent-tests.xml"
    if xml.exists():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        summary.update({k: int(suite.get(k, "0")) for k in ("tests", "failures", "errors", "skipped")})
        summary["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                             if c.find("failure") is not None or c.find("error") is not None]
    res["agent_env_tests"] = summary


def selftests(res: dict[str, Any]) -> None:
    art = str(PAYLOAD / "artifacts")
    backends: dict[str, Any] = {}
    t0 = time.monotonic()
    for b in BACKENDS:
        done = run([str(VENV / "fedge-agent"), "selftest", "--artifacts", art, "--backend", b],
                   f"selftest-{b}.log", timeout=900)
        report = last_json(done.stdout)
        if done.returncode == 0 and report.get("ok"):
            backends[b] = {"status": "ok", "loss_first": report.get("loss_first"),
                           "loss_last": report.get("loss_last"), "ms_per_step": report.get("ms_per_step"),
                           "features_ms": report.get("features_ms"), "peak_rss_mb": report.get("peak_rss_mb")}
        elif done.returncode < 0:
            backends[b] = {"status": f"selftest {exit_reason(done.returncode)}"}
        else:
            backends[b] = {"status": str(report.get("error") or exit_reason(done.returncode))}
    res["selftest"] = backends
    done = run([str(VENV / "fedge-agent"), "selftest", "--artifacts", art, "--probe"], "selftest-probe.log",
               timeout=900)
    res["probe"] = last_json(done.stdout).get("probe", {"error": exit_reason(done.returncode)})
    res["timings"]["selftests_s"] = round(time.monotonic() - t0, 1)


def repro(res: dict[str, Any]) -> None:
    if not (PAYLOAD / "repro").is_dir():
        return
    done = run([str(VENV / "python"), str(PAYLOAD / "repro_litert.py"), "run", str(PAYLOAD / "repro")],
               "repro.log", timeout=900)
    res["litert_repro"] = last_json(done.stdout) or {"error": exit_reason(done.returncode)}


def provision(res: dict[str, Any]) -> None:
    bundles = sorted((PAYLOAD / "bundles").glob("*/bundle.json"))
    if not bundles:
        return
    from fedge.devices.flash import flash

    t0 = time.monotonic()
    shim = Path("/usr/local/bin/sudo")  # flash runs "sudo sh install.sh"; the guest is root and has no sudo
    shim.write_text('#!/bin/sh\nexec "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(PAYLOAD / "aarch64-wheels"),
           "PIP_NO_COMPILE": "1"}
    transcript: list[str] = []

    def on_device(cmd: list[str] | tuple[str, ...], capture: bool) -> tuple[int, str]:
        """flash's ssh/scp, run on this machine: ``ssh -- host CMD`` is ``sh -c CMD``, ``scp`` a copy."""
        if cmd[0] == "scp":
            files, dest = list(cmd[cmd.index("--") + 1 : -1]), cmd[-1].split(":", 1)[1]
            done = subprocess.run(["cp", "-r", "--", *files, dest], capture_output=True, text=True, check=False)
        else:
            done = subprocess.run(["sh", "-c", cmd[-1]], capture_output=True, text=True, check=False, env=env,
                                  timeout=2400)
        transcript.append(f"$ {' '.join(cmd)}\nexit {done.returncode}\n{done.stdout}{done.stderr}")
        return done.returncode, done.stdout

    out: dict[str, Any] = {}
    try:
        flash(bundles[0].parent, "root@fedge-pi", run=on_device)
        out["flash"] = "ok"
    except Exception as exc:  # a failed install (or self-test) is the result
        out["flash"] = f"{type(exc).__name__}: {exc}"
    (OUT / "provision.log").write_text("\n".join(transcript))
    reports = [last_json(t) for t in transcript if '"probe"' in t]
    out["selftest"] = reports[-1].get("probe") if reports else None
    out["only_binary"] = "--only-binary=:all:" in (bundles[0].parent / "install.sh").read_text()
    time.sleep(5)
    active = subprocess.run(["systemctl", "is-active", "fedge-agent.service"], capture_output=True, text=True,
                            check=False)
    out["service"] = active.stdout.strip()
    subprocess.run(["systemctl", "stop", "fedge-agent.service"], check=False, capture_output=True)
    out["seconds"] = round(time.monotonic() - t0, 1)
    res["provision"] = out


def completed_rounds() -> int:
    try:
        return int(json.loads((AGENT_STATE / "state.json").read_text())["last_completed_round"])
    except (OSError, ValueError, KeyError):
        return 0


def agent_rounds(res: dict[str, Any]) -> None:
    t0 = time.monotonic()
    AGENT_STATE.mkdir(parents=True, exist_ok=True)
    with (OUT / "agent.log").open("w") as log:
        proc = subprocess.Popen([str(VENV / "fedge-agent"), "run", "--config", str(PAYLOAD / "agent.toml")],
                                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + AGENT_TIMEOUT_S
        while completed_rounds() < ROUNDS and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(1.0)
        alive = proc.poll() is None
        if alive:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    res["agent"] = {"completed_rounds": completed_rounds(), "alive_until_stopped": alive,
                    "exit": proc.returncode, "seconds": round(time.monotonic() - t0, 1)}
    backends = AGENT_STATE / "backends.json"
    if backends.exists():
        res["agent"]["backends"] = json.loads(backends.read_text()).get("verdicts")
    trained: dict[str, str] = {}
    for line in (OUT / "agent.log").read_text(errors="replace").splitlines():
        words = line.split("round ", 1)[-1].split(" ")  # "round 2: litert, 6 steps in ..."
        if " steps in " in line and len(words) > 1 and words[0].endswith(":"):
            trained[words[0].rstrip(":")] = words[1].rstrip(",")
    res["agent"]["trained_with"] = trained


def set_clock() -> float | None:
    """The guest's clock against the host's (``fedge.epoch=`` on the kernel command line, the host's time at boot,
    plus the uptime); set when more than 2 s off (round deadlines are the hub's wall-clock times). The skew found."""
    args = dict(a.split("=", 1) for a in Path("/proc/cmdline").read_text().split() if "=" in a)
    if "fedge.epoch" not in args:
        return None
    host_now = float(args["fedge.epoch"]) + float(Path("/proc/uptime").read_text().split()[0])
    skew = time.time() - host_now
    if abs(skew) > 2.0:
        subprocess.run(["date", "-u", "-s", f"@{host_now:.0f}"], check=False, capture_output=True)
    return round(skew, 1)


def main() -> int:
    OUT.mkdir(exist_ok=True)
    t0 = time.monotonic()
    skew = set_clock()
    # the system disk is larger than the image's file system (a qcow2 overlay): grow into it, as a Pi image does
    grow = subprocess.run(["resize2fs", "/dev/vda"], capture_output=True, text=True, check=False)
    res: dict[str, Any] = {"machine": platform.machine(), "python": platform.python_version(),
                           "kernel": platform.release(), "cpus": os.cpu_count(), "timings": {},
                           "uptime_at_start_s": float(Path("/proc/uptime").read_text().split()[0]),
                           "clock_skew_s": skew, "root_grown": grow.returncode == 0,
                           "root_free_mb": shutil.disk_usage("/").free // 2**20}
    say(f"{res['machine']}, Python {res['python']}, kernel {res['kernel']}, up {res['uptime_at_start_s']:.0f} s")
    steps = (("install", install), ("agent_env_tests", agent_tests), ("selftests", selftests),
             ("repro", repro), ("provision", provision), ("rounds", agent_rounds))
    for name, step in steps:
        say(f"{name} ...")
        try:
            step(res)
        except Exception:
            res.setdefault("errors", {})[name] = traceback.format_exc()[-2000:]
            say(f"{name} failed:\n{res['errors'][name]}")
            if name == "install":
                break
        (OUT / "guest.json").write_text(json.dumps(res, indent=2, sort_keys=True))
    res["timings"]["guest_total_s"] = round(time.monotonic() - t0, 1)
    (OUT / "guest.json").write_text(json.dumps(res, indent=2, sort_keys=True))
    os.sync()
    say("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
