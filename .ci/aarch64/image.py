"""The emulated Raspberry Pi of ``make test-aarch64``: a Debian 12 arm64 guest built from Debian's packages.

Two cached layers under ``cache_dir`` (default ``~/.cache/fedge/aarch64``, outside the clone), each keyed by
a digest of its inputs and built into a temporary folder that is renamed into place when complete:

* ``base-<key>/``: ``rootfs/`` (``debootstrap --variant=minbase`` of bookworm arm64 with python3, systemd,
  udev and the arm64 kernel; the second stage runs in a chroot through qemu-user/binfmt; an initramfs with a
  short module list; docs, locales and unneeded kernel modules removed), ``base.img`` (ext4 of it),
  ``vmlinuz`` and ``initrd.img``. Key: :data:`BASE_RECIPE`, the Debian mirror and suite, and every constant the
  layer is built from (packages, modules, unit and configuration files).
* ``venv-<key>/venv.img``: ext4 holding ``/opt/fedge/venv``, a venv made by the guest's own python3 (in a
  chroot of the base rootfs) with every dependency of ``fedge[agent]`` plus pytest and hypothesis, installed
  offline from aarch64 wheels downloaded on the host (``pip download --platform ...``). Key: the base key and
  the names of the wheels. ``wheels-<key>/``: those wheels, keyed by the requirements (a warm run needs no
  network). fedge itself is installed at boot from the run's payload disk.

Building needs root, ``debootstrap``, ``qemu-user-static`` with binfmt_misc and ``mkfs.ext4`` (e2fsprogs);
``make aarch64-deps`` installs them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
MIRROR = os.environ.get("FEDGE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PACKAGES = ("python3", "python3-venv", "systemd-sysv", "udev", "kmod", "linux-image-arm64", "initramfs-tools")
MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "ext4")  # the initramfs's short list
KEEP_MODULES = ("virtio", "ext4", "jbd2", "mbcache", "crc", "failover", "af_packet")  # path parts kept
WHEEL_TAGS = ("manylinux_2_36_aarch64", "manylinux_2_34_aarch64", "manylinux_2_28_aarch64",
              "manylinux_2_27_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64", "linux_aarch64")
GUEST_PACKAGES = ("pytest>=8", "hypothesis>=6.100")

UNIT = """[Unit]
Description=fedge aarch64 lane: run /payload/guest.py, then power off
After=network.target local-fs.target
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart=/opt/fedge/venv/bin/python /payload/guest.py
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=3600

[Install]
WantedBy=multi-user.target
"""
NETWORK = "[Match]\nName=eth0\n\n[Network]\nAddress=10.0.2.15/24\nGateway=10.0.2.2\nDNS=10.0.2.3\n"
FSTAB = ("LABEL=fedge-root / ext4 rw,noatime 0 1\nLABEL=fedge-venv /opt/fedge ext4 ro,noatime 0 0\n"
         "LABEL=fedge-payload /payload ext4 rw,noatime,nofail 0 0\n")
HOOK = """#!/bin/sh
case "$1" in prereqs) exit 0;; esac
. /usr/share/initramfs-tools/hook-functions
for m in {modules}; do manual_add_modules "$m"; done
"""


@dataclass(frozen=True)
class Image:
    """A ready guest: the kernel and initrd to boot, the system disk, the venv disk."""

    kernel: Path
    initrd: Path
    base: Path
    venv: Path
    wheels: Path  # the aarch64 wheels the venv was made from
    built: tuple[str, ...]  # the layers built now (empty: all from the cache)
    seconds: float


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _run(cmd: list[str], log: Path, **kw: object) -> None:
    with log.open("ab") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n".encode())
        fh.flush()
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False, **kw)  # type: ignore[call-overload]
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed with exit code {done.returncode}; see {log}:\n{tail}")


def _mkfs(folder: Path, image: Path, label: str, size_mb: int, log: Path) -> None:
    _run(["mkfs.ext4", "-q", "-F", "-L", label, "-m", "0", "-O", "^has_journal", "-d", str(folder), str(image),
          f"{size_mb}M"], log)


def _size_mb(folder: Path) -> int:
    done = subprocess.run(["du", "-sm", str(folder)], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[0])


def check_host() -> list[str]:
    """What the host lacks to build and boot the guest (empty: nothing)."""
    missing = [tool for tool in ("debootstrap", "qemu-system-aarch64", "qemu-img", "mkfs.ext4", "debugfs")
               if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()]
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        missing.append("binfmt_misc entry qemu-aarch64 (apt-get install qemu-user-static binfmt-support)")
    if os.geteuid() != 0:
        missing.append("root (debootstrap and chroot)")
    return missing


BASE_RECIPE = 1
"""Bump when the base layer's build steps change (its key also covers every constant it is built from)."""


def base_key() -> str:
    return _digest(str(BASE_RECIPE), MIRROR, SUITE, *PACKAGES, *MODULES, *KEEP_MODULES, UNIT, NETWORK, FSTAB, HOOK)


def _build_base(out: Path, log: Path) -> None:
    rootfs = out / "rootfs"
    _run(["debootstrap", "--arch=arm64", "--foreign", "--variant=minbase", f"--include={','.join(PACKAGES)}",
          SUITE, str(rootfs), MIRROR], log)
    conf = rootfs / "etc" / "initramfs-tools"
    (conf / "conf.d").mkdir(parents=True, exist_ok=True)
    (conf / "conf.d" / "fedge").write_text("MODULES=list\nCOMPRESS=gzip\n")
    (conf / "hooks").mkdir(parents=True, exist_ok=True)
    (conf / "hooks" / "fedge").write_text(HOOK.format(modules=" ".join(MODULES)))
    (conf / "hooks" / "fedge").chmod(0o755)
    _run(["chroot", str(rootfs), "/debootstrap/debootstrap", "--second-stage"], log)
    boot = rootfs / "boot"
    kernel = sorted(boot.glob("vmlinuz-*"))[-1]
    shutil.copyfile(kernel, out / "vmlinuz")
    shutil.copyfile(boot / kernel.name.replace("vmlinuz", "initrd.img"), out / "initrd.img")
    for f in boot.iterdir():
        f.unlink() if f.is_file() or f.is_symlink() else shutil.rmtree(f)
    _slim(rootfs, log)
    _configure(rootfs)
    _mkfs(rootfs, out / "base.img", "fedge-root", _size_mb(rootfs) + 256, log)


def _slim(rootfs: Path, log: Path) -> None:
    """Docs, man pages, locales, apt caches and every kernel module the guest does not load."""
    for sub in ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "var/cache/apt",
                "var/lib/apt/lists", "usr/lib/firmware"):
        shutil.rmtree(rootfs / sub, ignore_errors=True)
    for version in (rootfs / "lib" / "modules").iterdir():
        kernel = version / "kernel"
        for ko in list(kernel.rglob("*.ko*")):
            if not any(part in str(ko.relative_to(kernel)) for part in KEEP_MODULES):
                ko.unlink()
        _run(["chroot", str(rootfs), "depmod", version.name], log)


def _configure(rootfs: Path) -> None:
    etc = rootfs / "etc"
    (etc / "hostname").write_text("fedge-pi\n")
    (etc / "hosts").write_text("127.0.0.1 localhost fedge-pi\n")
    (etc / "fstab").write_text(FSTAB)
    (rootfs / "opt" / "fedge").mkdir(parents=True, exist_ok=True)
    (rootfs / "payload").mkdir(exist_ok=True)
    (etc / "systemd" / "network" / "eth0.network").write_text(NETWORK)
    units = etc / "systemd" / "system"
    (units / "fedge-lane.service").write_text(UNIT)
    wants = units / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    for name, target in (("fedge-lane.service", "/etc/systemd/system/fedge-lane.service"),
                         ("systemd-networkd.service", "/lib/systemd/system/systemd-networkd.service")):
        link = wants / name
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    for masked in ("serial-getty@ttyAMA0.service", "getty@tty1.service", "systemd-timesyncd.service",
                   "apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "fstrim.timer"):
        link = units / masked
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    (etc / "machine-id").write_text("")


def agent_requirements() -> list[str]:
    """What ``fedge[agent]`` depends on (from pyproject.toml), plus the test runner."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + list(project["optional-dependencies"]["agent"]) + list(GUEST_PACKAGES)
    return sorted(set(reqs))


def download_wheels(dest: Path, log: Path) -> list[Path]:
    """Wheels only (``--only-binary=:all:``) for CPython 3.11 on aarch64: nothing is built in the guest."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", "3.11",
           "--implementation", "cp", "--abi", "cp311", "-d", str(dest)]
    for tag in WHEEL_TAGS:
        cmd += ["--platform", tag]
    _run([*cmd, *agent_requirements()], log)
    return sorted(dest.glob("*.whl"))


def _build_venv(base: Path, wheels: list[Path], out: Path, log: Path) -> None:
    rootfs = base / "rootfs"
    stage = out / "stage"
    stage.mkdir(parents=True)
    mnt = rootfs / "opt" / "fedge"
    wheel_dir = rootfs / "tmp" / "fedge-wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    for w in wheels:
        shutil.copyfile(w, wheel_dir / w.name)
    _run(["mount", "--bind", str(stage), str(mnt)], log)
    _run(["mount", "-t", "proc", "proc", str(rootfs / "proc")], log)
    _run(["mount", "--bind", "/dev", str(rootfs / "dev")], log)
    try:
        _run(["chroot", str(rootfs), "/usr/bin/python3", "-m", "venv", "/opt/fedge/venv"], log)
        names = [f"/tmp/fedge-wheels/{w.name}" for w in wheels]
        _run(["chroot", str(rootfs), "/opt/fedge/venv/bin/pip", "install", "-q", "--no-index", "--no-deps",
              "--disable-pip-version-check", *names], log, env={**os.environ, "PIP_NO_CACHE_DIR": "1"})
    finally:
        for m in (mnt, rootfs / "proc", rootfs / "dev"):
            subprocess.run(["umount", str(m)], check=False)
        shutil.rmtree(wheel_dir, ignore_errors=True)
    _mkfs(stage, out / "venv.img", "fedge-venv", _size_mb(stage) + 64, log)
    shutil.rmtree(stage)


def _layer(cache: Path, name: str, build: object, log: Path) -> tuple[Path, bool]:
    """``cache/name``, built by ``build(tmp_folder)`` first when missing (returns the folder, and whether built)."""
    done = cache / name
    if (done / ".complete").exists():
        return done, False
    tmp = cache / f"{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)  # type: ignore[operator]
    (tmp / ".complete").write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
    shutil.rmtree(done, ignore_errors=True)
    tmp.rename(done)
    return done, True


def ensure_image(cache: Path, log: Path) -> Image:
    """The guest image, built (and cached) when its inputs changed."""
    t0 = time.monotonic()
    cache.mkdir(parents=True, exist_ok=True)
    missing = check_host()
    bkey = base_key()
    base_dir = cache / f"base-{bkey}"
    if not (base_dir / ".complete").exists() and missing:
        raise RuntimeError("cannot build the aarch64 guest: missing " + "; ".join(missing))
    base, built_base = _layer(cache, f"base-{bkey}", lambda d: _build_base(d, log), log)
    reqs = agent_requirements()
    wdir, built_wheels = _layer(cache, f"wheels-{_digest(*reqs, *WHEEL_TAGS)}", lambda d: download_wheels(d, log), log)
    wheels = sorted(wdir.glob("*.whl"))
    vkey = _digest(bkey, *(w.name for w in wheels))
    venv, built_venv = _layer(cache, f"venv-{vkey}", lambda d: _build_venv(base, wheels, d, log), log)
    built = tuple(name for name, b in (("base", built_base), ("wheels", built_wheels), ("venv", built_venv)) if b)
    return Image(base / "vmlinuz", base / "initrd.img", base / "base.img", venv / "venv.img", wdir, built,
                 time.monotonic() - t0)


def main(argv: list[str]) -> int:
    """``python .ci/aarch64/image.py [CACHE_DIR]``: build (or find) the guest image; print its files."""
    cache = Path(argv[0]) if argv else default_cache()
    log = cache / "build.log"
    cache.mkdir(parents=True, exist_ok=True)
    image = ensure_image(cache, log)
    print(f"aarch64 guest ready in {image.seconds:.0f} s (built: {', '.join(image.built) or 'nothing, all cached'})")
    for f in (image.kernel, image.initrd, image.base, image.venv):
        print(f"  {f} ({f.stat().st_size / 1e6:.0f} MB)")
    return 0


def default_cache() -> Path:
    return Path(os.environ.get("FEDGE_AARCH64_CACHE") or Path.home() / ".cache" / "fedge" / "aarch64")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
