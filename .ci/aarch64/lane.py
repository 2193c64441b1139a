"""``make test-aarch64``: the agent on an emulated Raspberry Pi (arm64 Debian 12 under qemu-system-aarch64).

1. The guest image (:mod:`image`): built once and cached outside the clone, keyed by its inputs.
2. The run's payload disk: a fedge wheel built from this checkout, the agent tests, artifacts exported here,
   one device's data, ``agent.toml`` (broker ``mqtt://10.0.2.2:PORT``: the host as seen from the guest), the
   LiteRT reproducer and :mod:`guest` (what the guest runs at boot).
3. mosquitto and a hub process on the host (the e2e suite's ``Fleet``), then the guest boots headless
   (``-M virt -cpu cortex-a72 -smp 2 -m 2048``; the system disk a 4 GB qcow2 overlay of the cached image, the venv
   disk ``snapshot=on``: the cache is never written).
   The guest installs fedge, runs the agent-environment tests, ``fedge-agent selftest`` per back-end and
   ``--probe``, the reproducer, then ``fedge-agent run``; the host runs one plain round, restarts the hub with
   ``[privacy]`` (local DP) and runs one DP round; the guest stops its agent and powers off.
4. The results are read back from the payload disk (``debugfs``) and summarised as ONE JSON object on the last
   line of stdout: ``ok``, ``backends`` (each back-end -> ``"ok"`` or why not), the rounds, the tests, the
   timings. Exit code 0 only when everything passed. Logs stay in ``build/aarch64-lane/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import image  # noqa: E402

DEVICE = "pi-00"
SAMPLES = 240
ROOT_DISK_GB = 4
QEMU = ["qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a72", "-smp", "2", "-m", "2048"]


def log(text: str) -> None:
    print(f"[test-aarch64 {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def payload(run: Path, broker_port: int, wheels: Path) -> tuple[Path, Any]:
    """The payload folder (see the module docstring) and the e2e FleetData of the host side."""
    from fedge.datasets.partition import make_device_shards, make_eval_set, write_partitions
    from fedge.datasets.shifts import Shift
    from fedge.datasets.source import load_source
    from fedge.export.testing import export_small
    from fedge.protocol.tomlfile import write_toml
    from tests.e2e.fleet import FleetData

    pay = run / "payload"
    export_small(pay / "artifacts", "cnn28", seed=0)
    source = load_source("auto")
    shards = make_device_shards(source, 1, 0.5, 7, Shift(), size_per_device=SAMPLES)
    (data,) = write_partitions(run / "shards", shards, source.num_classes)
    shutil.copyfile(data, pay / "data.npz")
    make_eval_set(source, Shift(), 300, 7, run / "eval.npz")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(pay / "wheels"), str(ROOT)],
                   check=True, capture_output=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "tests" / "agent", pay / "tests" / "agent", ignore=ignore)
    for name in ("conftest.py", "helpers.py"):
        shutil.copyfile(ROOT / "tests" / name, pay / "tests" / name)
    shutil.copyfile(ROOT / "pyproject.toml", pay / "pyproject.toml")
    for name in ("guest.py", "repro_litert.py"):
        shutil.copyfile(HERE / name, pay / name)
    subprocess.run([sys.executable, str(HERE / "repro_litert.py"), "build", str(pay / "repro")], check=True,
                   capture_output=True)
    (pay / "rounds").write_text("2\n")
    provision = [sys.executable, "-m", "fedge.cli", "devices", "provision", "--profile", "rpi4",
                 "--device-id", "pi-prov", "--fleet", "lane-provision", "--broker", f"mqtt://10.0.2.2:{broker_port}",
                 "--data", "/payload/data.npz", "--install-dir", "/opt/fedge-prov",
                 "--wheel", str(next((pay / "wheels").glob("fedge-*.whl"))), "--artifacts", str(pay / "artifacts"),
                 "--out", str(pay / "bundles")]
    subprocess.run(provision, check=True, capture_output=True)
    shutil.copytree(wheels, pay / "aarch64-wheels")
    (pay / "results").mkdir()
    write_toml(pay / "agent.toml", {
        "device_id": DEVICE, "fleet": "e2e", "data": "/payload/data.npz", "state_dir": "/var/lib/fedge-agent",
        "backend": "auto", "seed": 0, "max_round_s": 1200.0, "broker": {"url": f"mqtt://10.0.2.2:{broker_port}"}})
    return pay, FleetData(pay / "artifacts", (data,), (len(shards[0].y),), run / "eval.npz")


def boot(img: image.Image, pay_img: Path, console: Path) -> subprocess.Popen[bytes]:
    # the system disk: a copy-on-write overlay of the cached image, larger than it (the guest grows its file system
    # into it, as a Pi image does at first boot); the cache is never written
    root = console.parent / "root.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(img.base), "-F", "raw", str(root),
                    f"{ROOT_DISK_GB}G"], check=True)
    cmd = [*QEMU, "-kernel", str(img.kernel), "-initrd", str(img.initrd),
           "-append", f"root=/dev/vda rw console=ttyAMA0 net.ifnames=0 fedge.epoch={time.time():.0f}",
           "-drive", f"if=none,id=root,file={root},format=qcow2",
           "-device", "virtio-blk-pci,drive=root",
           "-drive", f"if=none,id=venv,file={img.venv},format=raw,snapshot=on",
           "-device", "virtio-blk-pci,drive=venv",
           "-drive", f"if=none,id=payload,file={pay_img},format=raw", "-device", "virtio-blk-pci,drive=payload",
           "-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0,romfile=",
           "-display", "none", "-monitor", "none", "-serial", f"file:{console}", "-no-reboot"]
    (console.parent / "qemu-cmd.txt").write_text(" ".join(cmd) + "\n")
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=(console.parent / "qemu.log").open("wb"))


def wait(fleet: Any, pred: Any, vm: subprocess.Popen[bytes], timeout_s: float, what: str) -> bool:
    """Wait for ``pred(fleet.seen)`` while the VM runs; False when the VM stopped or the time ran out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if vm.poll() is not None:
            log(f"the guest powered off while waiting for {what}")
            return False
        try:
            fleet.wait_for(pred, 2.0, what)
            return True
        except AssertionError:
            continue
    log(f"timed out after {timeout_s:.0f} s waiting for {what}")
    return False


def rounds(fleet: Any, vm: subprocess.Popen[bytes], out: dict[str, Any]) -> None:
    """One plain round, then (hub restarted with [privacy]) one local-DP round, with the guest's agent."""
    t0 = time.monotonic()
    if not wait(fleet, lambda s: DEVICE in s.online and s.models.get(DEVICE), vm, 2400, f"{DEVICE} online"):
        return
    out["timings"]["guest_agent_online_s"] = round(time.monotonic() - out["t0"], 1)
    plans = [("plain", {}), ("dp", {"privacy": {"mode": "local", "noise_multiplier": 1.0, "clip": 1.0,
                                                "sample_rate": 1.0, "delta": 1e-5, "epsilon_budget": 100.0}})]
    for rid, (name, sections) in enumerate(plans, start=1):
        if rid > 1:
            fleet.hub.stop()
            fleet.write_hub_toml(rounds={"min_devices": 1, "deadline_s": 900.0, "local_epochs": 1}, **sections)
            fleet.start_hub()
            if not wait(fleet, lambda s: DEVICE in s.online, vm, 300, f"{DEVICE} online again"):
                return
        t1 = time.monotonic()
        fleet.start_round()
        if not wait(fleet, lambda s, r=rid: r in s.results, vm, 1200, f"the result of round {rid}"):
            return
        result = fleet.seen.results[rid]
        rows = fleet.hub_sql("SELECT device, metrics FROM updates WHERE round = ?", (rid,))
        metrics = {d: json.loads(m) for d, m in rows}
        trained = [k.removeprefix("backend_") for k in metrics.get(DEVICE, {}) if k.startswith("backend_")]
        out["rounds"][name] = {"round": rid, "status": str(result.status), "contributed": DEVICE in metrics,
                               "backend": trained[0] if trained else None, "epsilon": result.epsilon,
                               "seconds": round(time.monotonic() - t1, 1)}
    out["timings"]["rounds_s"] = round(time.monotonic() - t0, 1)


def summarise(out: dict[str, Any], guest: dict[str, Any]) -> dict[str, Any]:
    selftest, probe = guest.get("selftest", {}), guest.get("probe", {})
    backends: dict[str, str] = {}
    for b in ("numpy", "litert", "ort"):
        st = selftest.get(b, {}).get("status", "not run")
        pr = probe.get(b, "not installed" if "not installed" in st else "not probed")
        st = st.removeprefix("ConfigError: config field 'backend': ")
        backends[b] = "ok" if st == "ok" and pr == "ok" else (st if st != "ok" else f"probe: {pr}")
    tests = guest.get("agent_env_tests", {})
    prov = guest.get("provision", {})
    checks = {
        "guest ran": bool(guest) and not guest.get("errors"),
        "pip check": guest.get("pip_check") == "ok",
        "agent-env tests": tests.get("exit") == 0 and not tests.get("failures") and not tests.get("errors"),
        "numpy trains": backends["numpy"] == "ok",
        "provisioned": prov.get("flash") == "ok" and prov.get("service") == "active" and prov.get("only_binary"),
        "litert trains": backends["litert"] == "ok",
        "plain round": out["rounds"].get("plain", {}).get("contributed") is True,
        "dp round": out["rounds"].get("dp", {}).get("contributed") is True,
        "agent stayed up": guest.get("agent", {}).get("alive_until_stopped") is True,
    }
    failed = [k for k, ok in checks.items() if not ok]
    trained = guest.get("agent", {}).get("trained_with", {})
    for r in out["rounds"].values():  # a DP update carries no metrics: the agent's log says what trained it
        r["backend"] = r["backend"] or trained.get(str(r["round"]))
    keys = ("machine", "python", "kernel", "cpus", "clock_skew_s")
    return {"ok": not failed, "failed": failed, "backends": backends, "rounds": out["rounds"],
            "agent_env_tests": {k: tests.get(k) for k in ("tests", "failures", "errors", "skipped", "seconds")},
            "selftest": selftest, "probe": probe, "litert_repro": guest.get("litert_repro"), "provision": prov,
            "agent": guest.get("agent"),
            "guest": {k: guest.get(k) for k in keys}, "image": out["image"],
            "timings": {**out["timings"], **guest.get("timings", {})}, "logs": str(out["run"])}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="make test-aarch64", description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--cache", type=Path, default=image.default_cache(), help="image cache (outside the clone)")
    ap.add_argument("--run-dir", type=Path, default=ROOT / "build" / "aarch64-lane")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    out: dict[str, Any] = {"t0": t0, "timings": {}, "rounds": {}, "run": args.run_dir}
    img = image.ensure_image(args.cache, args.cache / "build.log")
    out["image"] = {"cache": str(args.cache), "built": list(img.built), "seconds": round(img.seconds, 1),
                    "mb": {f.name: round(f.stat().st_size / 1e6) for f in (img.base, img.venv, img.kernel, img.initrd)}}
    log(f"guest image ready in {img.seconds:.0f} s (built: {', '.join(img.built) or 'nothing'})")
    shutil.rmtree(args.run_dir, ignore_errors=True)
    args.run_dir.mkdir(parents=True)
    from tests.e2e.fleet import Fleet
    from tests.helpers import Mosquitto

    t1 = time.monotonic()
    with Mosquitto(args.run_dir / "mosquitto") as broker:
        pay, data = payload(args.run_dir, broker.port, img.wheels)
        pay_img = args.run_dir / "payload.img"
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "fedge-payload", "-d", str(pay), str(pay_img),
                        f"{image._size_mb(pay) + 256}M"], check=True)
        out["timings"]["payload_s"] = round(time.monotonic() - t1, 1)
        fleet = Fleet(args.run_dir / "fleet", data, broker.url, n_agents=0)
        fleet.write_hub_toml(rounds={"min_devices": 1, "deadline_s": 900.0, "local_epochs": 1})
        vm = None
        try:
            fleet.start_hub()
            log(f"booting the guest (console: {args.run_dir / 'console.log'})")
            vm = boot(img, pay_img, args.run_dir / "console.log")
            rounds(fleet, vm, out)
            try:
                vm.wait(timeout=1800)
            except subprocess.TimeoutExpired:
                log("the guest did not power off: killed")
        finally:
            if vm is not None and vm.poll() is None:
                vm.kill()
                vm.wait()
            fleet.close()
    (args.run_dir / "root.qcow2").unlink(missing_ok=True)  # the guest's writes to its system disk
    results = args.run_dir / "results"
    subprocess.run(["debugfs", "-R", f"rdump /results {args.run_dir}", str(pay_img)], check=False,
                   capture_output=True)
    guest_json = results / "guest.json"
    guest = json.loads(guest_json.read_text()) if guest_json.exists() else {}
    out["timings"]["total_s"] = round(time.monotonic() - t0, 1)
    summary = summarise(out, guest)
    (args.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    log("ok" if summary["ok"] else f"FAILED: {', '.join(summary['failed'])} (logs: {args.run_dir})")
    print(json.dumps(summary, sort_keys=True))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
