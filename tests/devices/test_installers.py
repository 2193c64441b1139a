"""Safe installers (issue 12, item 6): validated install_dir and user, quoted scripts and units, a pinned and
hash-checked fedge, a private temporary folder on the target, ``--`` before every SSH target, no password left
behind by a flash."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import stat
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from fedge.devices.flash import STAGE, flash
from fedge.devices.installer import systemd_quote
from fedge.devices.profiles import get_profile
from fedge.devices.provision import Provisioning, provision
from fedge.protocol.errors import ConfigError

PASSWORD = "pw-3f9a1c0be7d24e58"


def _bundle(tmp_path: Path, profile: str = "rpi5", **kw: str) -> Path:
    p = Provisioning("pi-07", "farm", "mqtt://h:1883", "/var/lib/fedge/data.npz", **kw)
    return provision(p, get_profile(profile), tmp_path / "bundles", password=PASSWORD)


def _fake_wheel(folder: Path, version: str = "0.1.0") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"fedge-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("fedge/__init__.py", f"__version__ = {version!r}\n")
    return wheel


@pytest.mark.parametrize("install_dir", [
    "/opt/x; rm -rf /", "opt/fedge", "/opt/fe dge", "/opt/../etc/fedge", "/opt/./fedge", "/opt/$(reboot)",
    "/opt/`id`", "/opt/a'b", '/opt/a"b', "/opt/fedge\nrm", "/", "//opt", "/opt//fedge", "/opt/fedge/", "/opt/-x",
    "/opt/a|b", "/opt/a&b", "/opt/a\\b", "/opt/%h",
])
def test_a_hostile_install_dir_is_a_config_error_naming_the_field(install_dir: str) -> None:
    with pytest.raises(ConfigError) as err:
        Provisioning("pi-07", "farm", "mqtt://h:1883", "/d.npz", install_dir=install_dir)
    assert err.value.field == "install_dir"


@pytest.mark.parametrize("user", ["root; rm -rf /", "-oops", "fe dge", "", "Fedge", "fedge$", "a" * 33, "$(id)",
                                  "fedge\n"])
def test_a_bad_user_is_a_config_error_naming_the_field(user: str) -> None:
    with pytest.raises(ConfigError) as err:
        Provisioning("pi-07", "farm", "mqtt://h:1883", "/d.npz", user=user)
    assert err.value.field == "user"


def test_unusual_but_valid_values_are_accepted_and_quoted(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path, install_dir="/srv/fedge-agent+v1/x.y_z", user="_fedge-2")
    script = (bundle / "install.sh").read_text()
    for shell in ("bash", "sh"):
        assert subprocess.run([shell, "-n", str(bundle / "install.sh")], check=False).returncode == 0
    # every provisioned value enters the script once, as a shell-quoted assignment, and is used as "$var"
    assert "install_dir=/srv/fedge-agent+v1/x.y_z\n" in script and script.count("/srv/fedge-agent") == 1
    assert "agent_user=_fedge-2\n" in script and script.count("_fedge-2") == 1
    assert "{" not in script.replace("${", ""), "no template placeholder left"
    unit = (bundle / "fedge-agent.service").read_text()
    assert "User=_fedge-2\n" in unit and "WorkingDirectory=/srv/fedge-agent+v1/x.y_z\n" in unit
    assert "ExecStart=/srv/fedge-agent+v1/x.y_z/venv/bin/fedge-agent run --config " \
           "/srv/fedge-agent+v1/x.y_z/agent.toml\n" in unit


def test_termux_boot_script_is_quoted(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path, "android-termux", install_dir="/data/data/com.termux/files/home/fedge")
    boot = bundle / "termux-boot.sh"
    assert subprocess.run(["bash", "-n", str(boot)], check=False).returncode == 0
    words = shlex.split(boot.read_text().splitlines()[-1])
    assert words[:4] == ["exec", "/data/data/com.termux/files/home/fedge/venv/bin/fedge-agent", "run", "--config"]


def test_systemd_quoting() -> None:
    assert systemd_quote("/opt/fedge/agent.toml") == "/opt/fedge/agent.toml"
    assert systemd_quote('/a b/%i$HOME"x\\') == '"/a b/%%i$$HOME\\"x\\\\"'
    assert systemd_quote("") == '""'


def test_without_a_wheel_the_installer_pins_the_provisioned_version(tmp_path: Path) -> None:
    from importlib.metadata import version

    bundle = _bundle(tmp_path)
    script = (bundle / "install.sh").read_text()
    assert f"version={version('fedge')}\n" in script
    assert 'requirement="fedge[$extras]==$version"' in script
    assert json.loads((bundle / "bundle.json").read_text())["version"] == version("fedge")


def test_a_bundled_wheel_is_pinned_by_its_sha256(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / "dist", "0.1.0")
    p = Provisioning("pi-07", "farm", "mqtt://h:1883", "/d.npz", install_dir=str(tmp_path / "target" / "fedge"))
    bundle = provision(p, get_profile("x86-dev"), tmp_path / "bundles", password=PASSWORD, wheel=wheel)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["wheel"] == wheel.name and meta["wheel_sha256"] == digest and meta["version"] == "0.1.0"
    script = (bundle / "install.sh").read_text()
    assert f"wheel_sha256={digest}\n" in script and f"wheel={wheel.name}\n" in script

    # a wheel swapped after provisioning is refused before anything is installed; the temporary folder is gone
    (bundle / wheel.name).write_bytes(wheel.read_bytes() + b"tampered")
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    run = subprocess.run(["sh", str(bundle / "install.sh")], capture_output=True, text=True, check=False,
                         env={**os.environ, "TMPDIR": str(tmp)})
    assert run.returncode != 0 and "sha256" in run.stderr, run.stderr
    assert not (tmp_path / "target").exists(), "nothing installed"
    assert list(tmp.iterdir()) == [], "the mktemp folder is removed on exit"


def test_a_wheel_with_another_name_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "evil-1.0-py3-none-any.whl"
    other.write_bytes(b"x")
    p = Provisioning("pi-07", "farm", "mqtt://h:1883", "/d.npz")
    with pytest.raises(ConfigError) as err:
        provision(p, get_profile("rpi5"), tmp_path / "bundles", wheel=other)
    assert err.value.field == "wheel"


class FakeSsh:
    """Records the commands; ``mktemp -d`` answers a folder name; ``fail_on`` makes one program fail."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, cmd: Sequence[str], capture: bool) -> tuple[int, str]:
        self.calls.append(list(cmd))
        if cmd[0] == self.fail_on:
            return 1, ""
        return 0, "/tmp/tmp.Xb3kQ9\n" if capture else ""


def test_flash_over_ssh_uses_a_mktemp_folder_and_double_dash_before_the_target(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    ssh = FakeSsh()
    cmds = flash(bundle, "pi@10.0.0.9", run=ssh)
    assert ssh.calls == cmds
    for cmd in cmds:  # "--" ends the options before the first operand
        assert cmd[0] in ("ssh", "scp")
        first_operand = next(i for i, w in enumerate(cmd[1:], 1) if not w.startswith("-"))
        assert cmd[first_operand - 1] == "--", cmd
    mk, copy, install = cmds
    assert mk[-2:] == ["pi@10.0.0.9", "mktemp -d"]
    assert copy[-1] == "pi@10.0.0.9:/tmp/tmp.Xb3kQ9/"
    sent = {Path(f).name for f in copy[copy.index("--") + 1:-1]}
    assert sent == {"agent.toml", "install.sh", "fedge-agent.service", "bundle.json"}
    remote = install[-1]
    assert "sudo sh /tmp/tmp.Xb3kQ9/install.sh" in remote and "rm -rf -- /tmp/tmp.Xb3kQ9" in remote
    assert not any("/tmp/fedge-bundle" in " ".join(c) for c in cmds), "no fixed /tmp path"


def test_a_failed_copy_removes_the_remote_folder(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    ssh = FakeSsh(fail_on="scp")
    with pytest.raises(ConfigError) as err:
        flash(bundle, "pi@10.0.0.9", run=ssh)
    assert err.value.field == "target"
    assert ssh.calls[-1] == ["ssh", "--", "pi@10.0.0.9", "rm -rf -- /tmp/tmp.Xb3kQ9"]


@pytest.mark.parametrize("target", ["-oProxyCommand=touch /tmp/x@h", "pi@-oProxyCommand=x", "pi@host;reboot",
                                    "pi@ho st", "@h", "pi@", "pi@h:/etc", "-F@h", "pi@h\n"])
def test_option_like_or_odd_ssh_targets_are_refused(tmp_path: Path, target: str) -> None:
    bundle = _bundle(tmp_path)
    ssh = FakeSsh()
    with pytest.raises(ConfigError) as err:
        flash(bundle, target, run=ssh)
    assert err.value.field == "target" and ssh.calls == []


def test_flash_into_a_mounted_root_leaves_the_password_only_in_the_agent_config(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    root = tmp_path / "rootfs"
    (root / "tmp").mkdir(parents=True)
    flash(bundle, str(root))
    holders = [f for f in root.rglob("*") if f.is_file() and PASSWORD.encode() in f.read_bytes()]
    assert holders == [root / "opt" / "fedge" / "agent.toml"]
    assert stat.S_IMODE(holders[0].stat().st_mode) == 0o600
    assert list((root / "tmp").iterdir()) == []
    stage = root / STAGE.lstrip("/")
    assert stat.S_IMODE(stage.stat().st_mode) == 0o700 and (stage / "install.sh").is_file()
    assert not (stage / "credentials.txt").exists() and not (stage / "agent.toml").exists()
    wants = root / "etc" / "systemd" / "system" / "multi-user.target.wants" / "fedge-firstboot.service"
    assert os.readlink(wants) == "/etc/systemd/system/fedge-firstboot.service"
    unit = (root / "etc" / "systemd" / "system" / "fedge-firstboot.service").read_text()
    assert f"ExecStartPost=/bin/rm -rf {STAGE}" in unit, "the staged bundle is removed once installed"


def test_flash_into_a_root_refuses_a_symlink_that_leaves_it(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    root = tmp_path / "rootfs"
    root.mkdir()
    outside = tmp_path / "host-opt"
    outside.mkdir()
    (root / "opt").symlink_to(outside)
    with pytest.raises(ConfigError) as err:
        flash(bundle, str(root))
    assert err.value.field == "target" and list(outside.iterdir()) == []


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedge.cli", "devices", *args], capture_output=True, text=True,
                          check=False)


def test_cli_refuses_hostile_values_with_a_config_error(tmp_path: Path) -> None:
    out = tmp_path / "bundles"
    run = _cli("provision", "--profile", "rpi5", "--device-id", "pi-1", "--fleet", "f", "--broker", "mqtt://h:1883",
               "--data", "/d.npz", "--install-dir", "/opt/x; rm -rf /", "--out", str(out))
    assert run.returncode == 2 and "'install_dir'" in run.stderr and "Traceback" not in run.stderr
    assert not out.exists()
    run = _cli("provision", "--profile", "rpi5", "--device-id", "pi-1", "--fleet", "f", "--broker", "mqtt://h:1883",
               "--data", "/d.npz", "--user", "x;id", "--out", str(out))
    assert run.returncode == 2 and "'user'" in run.stderr
    bundle = _bundle(tmp_path)
    run = _cli("flash", "--bundle", str(bundle), "--target=-oProxyCommand=id@h", "--dry-run")
    assert run.returncode == 2 and "'target'" in run.stderr
    run = _cli("flash", "--bundle", str(bundle), "--target", "pi@h", "--dry-run")
    lines = run.stdout.splitlines()
    assert run.returncode == 0 and len(lines) == 3, run.stdout
    assert all(" -- " in line and line.index(" -- ") < line.index("pi@h") for line in lines), run.stdout


def test_an_aarch64_bundle_installs_wheels_only_and_self_tests_before_starting(tmp_path: Path,
                                                                                artifacts_dir: Path) -> None:
    """rpi4 (aarch64): pip may only install wheels (no ONNX Runtime training: it has none for aarch64), and the
    installer runs the probe self-test on the bundled model with the profile's back-end before the service."""
    p = Provisioning("pi-07", "farm", "mqtt://h:1883", "/d.npz")
    profile = get_profile("rpi4")
    bundle = provision(p, profile, tmp_path / "bundles", password=PASSWORD, artifacts=artifacts_dir)
    script = (bundle / "install.sh").read_text()
    assert '--only-binary=:all: -- "$requirement"' in script and "extras=agent\n" in script
    assert f"backend={profile.backend}\n" in script
    selftest = script.index('selftest --probe --backend "$backend" --artifacts "$here/selftest"')
    assert selftest < script.index("systemctl enable --now"), "the self-test runs before the agent starts"
    assert subprocess.run(["sh", "-n", str(bundle / "install.sh")], check=False).returncode == 0
    assert json.loads((bundle / "bundle.json").read_text())["selftest"] is True
    from fedge.protocol.manifest import verify_artifacts

    assert verify_artifacts(bundle / "selftest").backbone_sha256 == verify_artifacts(artifacts_dir).backbone_sha256
    _, copy, _ = flash(bundle, "pi@10.0.0.9", run=FakeSsh())
    assert "-r" in copy[:copy.index("--")] and str(bundle / "selftest") in copy
    root = tmp_path / "rootfs"
    root.mkdir()
    flash(bundle, str(root))
    assert (root / STAGE.lstrip("/") / "selftest" / "model.tflite").is_file()


def test_a_tampered_model_is_not_bundled(tmp_path: Path, artifacts_dir: Path) -> None:
    import shutil

    from fedge.protocol.errors import ArtifactError

    bad = tmp_path / "bad"
    shutil.copytree(artifacts_dir, bad)
    (bad / "model.tflite").write_bytes((bad / "model.tflite").read_bytes()[:-1] + b"\0")
    p = Provisioning("pi-07", "farm", "mqtt://h:1883", "/d.npz")
    with pytest.raises(ArtifactError):
        provision(p, get_profile("rpi4"), tmp_path / "bundles", password=PASSWORD, artifacts=bad)


def test_the_installer_self_test_fails_the_install_when_the_back_end_does_not_work(tmp_path: Path,
                                                                                   artifacts_dir: Path) -> None:
    """The self-test step of install.sh, run for real with this checkout's fedge-agent: a LiteRT that crashes in
    training (a real SIGSEGV in the probe's worker) fails it with the reason; a working one passes."""
    script = (Path(__file__).resolve().parents[2] / "devices" / "templates" / "install.sh").read_text()
    start = script.index("if [ -f \"$here/selftest/manifest.json\" ]")
    end = script.index("{service_install}")
    venv = tmp_path / "fedge" / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "fedge-agent").symlink_to(Path(sys.executable).parent / "fedge-agent")
    (tmp_path / "selftest").symlink_to(artifacts_dir)
    step = tmp_path / "step.sh"
    step.write_text(f"set -eu\nhere={shlex.quote(str(tmp_path))}\ninstall_dir={shlex.quote(str(tmp_path / 'fedge'))}"
                    f"\nbackend=litert\n{script[start:end]}echo INSTALLED\n")
    ok = subprocess.run(["sh", str(step)], capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and "INSTALLED" in ok.stdout, ok.stderr
    assert json.loads(ok.stdout.splitlines()[0])["probe"]["litert"] == "ok"
    crash = subprocess.run(["sh", str(step)], capture_output=True, text=True, check=False,
                           env={**os.environ, "FEDGE_WORKER_FAULT": "litert:segv:train_step"})
    assert crash.returncode == 1 and "INSTALLED" not in crash.stdout
    assert json.loads(crash.stdout.splitlines()[0])["probe"]["litert"] == "crashed with SIGSEGV in train_step"
    assert "the self-test failed on this device" in crash.stderr
