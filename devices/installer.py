"""What a bundle installs with: ``install.sh``, the service file, and the pinned fedge it installs.

Every value that enters a script or a unit is quoted for the language it lands in: ``shlex.quote`` for the
shell (each value is assigned once at the top of ``install.sh`` and used as ``"$var"``), :func:`systemd_quote`
for systemd command lines. Values are validated before they get here (``Provisioning``); the quoting is the
second line of defence, not the first.

The installer installs exactly one version of fedge: a wheel bundled with the device's files, checked against
its sha256 before pip sees it, or, without a wheel, ``fedge[extras]==VERSION`` from the package index, where
VERSION is the fedge doing the provisioning. Dependencies come from the index (their versions are bounded by
fedge's metadata, not hashed).
"""

from __future__ import annotations

import hashlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

from fedge.protocol.errors import ConfigError

_SYSTEMD_SAFE = re.compile(r"[A-Za-z0-9_@+=:,./-]+")
# PEP 427 file name of a pure-Python fedge wheel, as `pip wheel` writes it
_WHEEL = re.compile(r"fedge-(?P<version>[0-9][0-9A-Za-z.+!_]*)-py3-none-any\.whl")


def systemd_quote(value: str) -> str:
    """``value`` as one word of a systemd command line (``ExecStart=``): ``%`` and ``$`` escaped, and quoted
    (C-style, in double quotes) unless it is made of plainly safe characters."""
    escaped = value.replace("%", "%%").replace("$", "$$")
    if _SYSTEMD_SAFE.fullmatch(escaped):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _template(name: str) -> str:
    return resources.files("fedge.devices").joinpath("templates", name).read_text(encoding="utf-8")


@dataclass(frozen=True)
class Pin:
    """The fedge a bundle installs: ``version``, and the bundled ``wheel`` file name and its sha256 (both
    empty when it comes from the package index)."""

    version: str
    wheel: str = ""
    wheel_sha256: str = ""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def index_pin() -> Pin:
    """Pin the version of the installed fedge (the one provisioning)."""
    try:
        return Pin(metadata.version("fedge"))
    except metadata.PackageNotFoundError:
        raise ConfigError("wheel", "fedge is not installed as a distribution: pass --wheel (a fedge wheel, "
                                   "or the source folder to build one from)") from None


def bundle_wheel(source: Path, bundle: Path) -> Pin:
    """Put a fedge wheel into ``bundle`` and pin it: ``source`` is a ``fedge-*-py3-none-any.whl`` file, or a
    source folder (with ``pyproject.toml``) built with ``pip wheel --no-deps``."""
    if source.is_dir():
        if not (source / "pyproject.toml").is_file():
            raise ConfigError("wheel", f"{str(source)!r} is neither a wheel nor a source folder with pyproject.toml")
        with tempfile.TemporaryDirectory(prefix="fedge-wheel-") as tmp:
            built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir",
                                    tmp, "--", str(source)], capture_output=True, text=True, check=False)
            wheels = sorted(Path(tmp).glob("fedge-*.whl"))
            if built.returncode != 0 or len(wheels) != 1:
                raise ConfigError("wheel", f"pip wheel {source} failed: {built.stderr.strip()[-2000:]}")
            return bundle_wheel(wheels[0], bundle)
    match = _WHEEL.fullmatch(source.name)
    if match is None or not source.is_file():
        raise ConfigError("wheel", f"{str(source)!r} is not a fedge-VERSION-py3-none-any.whl file")
    shutil.copyfile(source, bundle / source.name)
    return Pin(match["version"], source.name, sha256_file(bundle / source.name))


def _service_install(service: str) -> str:
    if service == "systemd":
        return (
            'id -u -- "$agent_user" >/dev/null 2>&1 || '
            'useradd --system --no-create-home --home-dir "$install_dir" --shell /usr/sbin/nologin -- "$agent_user"\n'
            'chown -- "$agent_user" "$install_dir/state" "$install_dir/agent.toml"\n'
            'install -m 644 -- "$here/fedge-agent.service" /etc/systemd/system/fedge-agent.service\n'
            "systemctl daemon-reload\n"
            "systemctl enable --now fedge-agent.service"
        )
    return 'mkdir -p ~/.termux/boot\ninstall -m 755 -- "$here/termux-boot.sh" ~/.termux/boot/fedge-agent'


def install_script(install_dir: str, user: str, extras: tuple[str, ...], service: str, pin: Pin, *,
                   backend: str = "auto", wheels_only: bool = False) -> str:
    """``install.sh``: every value a shell-quoted assignment at the top. ``wheels_only``: pip installs wheels only
    (``--only-binary=:all:``: nothing is compiled on the device; a dependency without a wheel for its platform fails
    the install instead). The self-test (``fedge-agent selftest --probe --backend BACKEND``) runs before the service
    is installed when the bundle holds the fleet's model (``selftest/``)."""
    q = shlex.quote
    return _template("install.sh").format(
        install_dir=q(install_dir), user=q(user), extras=q(",".join(extras)), version=q(pin.version),
        wheel=q(pin.wheel), wheel_sha256=q(pin.wheel_sha256), backend=q(backend),
        pip_options="--only-binary=:all: " if wheels_only else "", service_install=_service_install(service),
    )


def systemd_unit(install_dir: str, user: str, device_id: str, fleet: str, memory_max_mb: int) -> str:
    """``fedge-agent.service`` (``install_dir`` is validated: a plain path, safe for ``WorkingDirectory=``)."""
    exec_start = " ".join(systemd_quote(w) for w in
                          (f"{install_dir}/venv/bin/fedge-agent", "run", "--config", f"{install_dir}/agent.toml"))
    return _template("fedge-agent.service").format(
        device_id=device_id, fleet=fleet, user=user, install_dir=install_dir.replace("%", "%%"),
        exec_start=exec_start, memory_max_mb=memory_max_mb,
    )


def render_firstboot(stage: str) -> str:
    """``fedge-firstboot.service``: runs the installer staged in ``stage`` once, on the device's first boot."""
    return _template("fedge-firstboot.service").format(stage=stage)


def termux_boot(install_dir: str) -> str:
    """``termux-boot.sh`` for Termux:Boot."""
    q = shlex.quote
    return _template("termux-boot.sh").format(
        agent=q(f"{install_dir}/venv/bin/fedge-agent"), config=q(f"{install_dir}/agent.toml"),
        log=q(f"{install_dir}/agent.log"),
    )


__all__ = ["Pin", "bundle_wheel", "index_pin", "install_script", "render_firstboot", "sha256_file", "systemd_quote",
           "systemd_unit", "termux_boot"]
