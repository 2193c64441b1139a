"""``fedge fleet init`` (issue 11, items 1 and 4): the generated files, and a real mosquitto started from them that
binds each participant's identity to its connection.

The other half of item 4, the hub refusing an update whose body names another device than its topic, is
``RejectReason.DEVICE_MISMATCH`` in tests/hub/test_rounds.py (``test_every_reject_reason_is_sent_and_counted...``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import ipaddress
import os
import pwd
import queue
import shutil
import signal
import ssl
import stat
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from paho.mqtt.enums import CallbackAPIVersion

from fedge.cli import main
from fedge.devices.fleet import FleetDir, add_device, check_password, hash_password
from fedge.hub.config import load_config
from fedge.protocol.errors import ConfigError, TransportError
from fedge.protocol.tomlfile import read_toml
from fedge.protocol.topics import Topics
from fedge.protocol.transport_mqtt import MqttTransport
from tests.devices.secure_broker import SecureBroker
from tests.helpers import wait_until

FLEET = "sec"
PRIVATE = ("ca.key", "server.key", "hub-signing.key", "passwd", "hub.toml", "operator.toml")


def test_init_writes_a_private_fleet_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "fleet"
    me = pwd.getpwuid(os.geteuid()).pw_name  # the broker as the folder's owner (root: see the test after this)
    assert main(["fleet", "init", "--fleet", FLEET, "--dir", str(root), "--broker-host", "broker.example",
                 "--port", "18883", "--broker-user", me]) == 0
    assert "mosquitto -c" in capsys.readouterr().out
    d = FleetDir.at(root)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700 and stat.S_IMODE(d.data.stat().st_mode) == 0o700
    for name in PRIVATE:
        assert stat.S_IMODE((root / name).stat().st_mode) == 0o600, name
    assert not any(stat.S_IMODE(p.stat().st_mode) & 0o022 for p in root.iterdir())

    ca = x509.load_pem_x509_certificate(d.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(d.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"broker.example", "localhost"}
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert server.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=365)
    server_key = serialization.load_pem_private_key(d.server_key.read_bytes(), None)
    assert isinstance(server_key, ec.EllipticCurvePrivateKey)
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert server_key.public_key().public_bytes(der, spki) == server.public_key().public_bytes(der, spki)

    signing = serialization.load_pem_private_key(d.signing_key.read_bytes(), None)
    public = serialization.load_pem_public_key(d.signing_pub.read_bytes())
    assert isinstance(signing, Ed25519PrivateKey) and isinstance(public, Ed25519PublicKey)
    public.verify(signing.sign(b"model"), b"model")

    conf = d.mosquitto_conf.read_text()
    for line in ("listener 18883", f"cafile {d.ca_cert}", f"certfile {d.server_cert}", f"keyfile {d.server_key}",
                 "allow_anonymous false", f"password_file {d.passwd}", f"acl_file {d.acl}", "persistence true",
                 f"persistence_location {d.data}/", "max_queued_messages 0", "use_username_as_clientid true",
                 f"pid_file {d.root / 'mosquitto.pid'}"):
        assert line in conf.splitlines(), line
    acl = d.acl.read_text().splitlines()
    assert "pattern write fedge/sec/update/%u" in acl and "pattern read fedge/sec/device/%u/#" in acl
    assert "topic write fedge/sec/control/#" in acl and "topic readwrite fedge/sec/#" in acl

    hub = load_config(d.hub_toml)  # the hub accepts its generated config as is
    assert (hub.fleet, hub.broker.config.url, hub.broker.config.username) == (FLEET, "mqtts://broker.example:18883",
                                                                              "fedge-hub")
    assert hub.broker.config.ca_file == str(d.ca_cert) and hub.broker.config.tls
    assert hub.signing_key == d.signing_key  # the hub signs what it publishes with the generated key
    passwd = dict(line.split(":", 1) for line in d.passwd.read_text().splitlines())
    assert check_password(passwd["fedge-hub"], hub.broker.config.password or "")
    operator = read_toml(d.operator_toml)["broker"]
    assert operator["username"] == "fedge-operator" and check_password(passwd["fedge-operator"], operator["password"])
    assert read_toml(d.meta)["broker_url"] == "mqtts://broker.example:18883"

    # a second init would make a new CA and lock every provisioned device out
    assert main(["fleet", "init", "--fleet", FLEET, "--dir", str(root)]) == 2
    assert "already holds a fleet" in capsys.readouterr().err


@pytest.mark.e2e
@pytest.mark.skipif(os.geteuid() != 0, reason="mosquitto drops privileges only when started as root")
def test_run_as_root_the_broker_runs_as_an_unprivileged_user(tmp_path: Path) -> None:
    """Issue 21, item 6: ``fleet init`` as root makes mosquitto drop to an unprivileged account (mosquitto, else
    nobody), hands it only what it needs, refuses a folder it could not reach, and a device added later still gets
    in after a reload (the password file keeps the broker's ownership)."""
    from fedge.devices.fleet import default_broker_user, init_fleet
    from fedge.hub.mosquitto import MOSQUITTO, free_port, wait_port

    user = default_broker_user()
    assert user != "root"
    with pytest.raises(ConfigError) as err:  # pytest's folders are 0700 root: the broker's user cannot pass
        init_fleet(FLEET, tmp_path / "fleet", broker_host="127.0.0.1")
    assert err.value.field == "dir" and user in str(err.value)
    base = Path(tempfile.mkdtemp(prefix="fedge-fleet-", dir="/tmp"))
    base.chmod(0o711)
    port = free_port()
    proc = None
    try:
        d = init_fleet(FLEET, base / "fleet", broker_host="127.0.0.1", port=port, bind="127.0.0.1")
        assert f"user {user}" in d.mosquitto_conf.read_text().splitlines()
        uid = pwd.getpwnam(user).pw_uid
        assert {p.name for p in d.root.iterdir() if p.stat().st_uid == uid} == {
            "server.key", "passwd", "mosquitto-data", "mosquitto.pid"}
        assert all(stat.S_IMODE(d.root.joinpath(n).stat().st_mode) == 0o600 for n in ("ca.key", "hub-signing.key"))
        assert stat.S_IMODE(d.root.stat().st_mode) == 0o711  # it may pass, not list
        with (base / "mosquitto.log").open("wb") as log:
            proc = subprocess.Popen([MOSQUITTO, "-c", str(d.mosquitto_conf)], stdout=log, stderr=log)
        wait_port("127.0.0.1", port)
        assert Path(f"/proc/{proc.pid}/status").read_text().count(f"\t{uid}\t") >= 1  # Uid: real, effective...
        add_device(d.root, "device-00", "pw-00")  # rewrites passwd as root: it must stay the broker's
        assert d.passwd.stat().st_uid == uid
        proc.send_signal(signal.SIGHUP)
        cfg = {"url": f"mqtts://127.0.0.1:{port}", "username": "device-00", "password": "pw-00",
               "ca_file": str(d.ca_cert)}
        from fedge.protocol.mqtt_config import BrokerConfig

        t = MqttTransport(BrokerConfig.from_mapping(cfg), "device-00", session_expiry_s=0)
        assert wait_until(lambda: _transport_connects(t), 10), (base / "mosquitto.log").read_text()[-2000:]
        t.close()
        assert proc.poll() is None  # the reload read the new password file
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(base, ignore_errors=True)


def _transport_connects(t: MqttTransport) -> bool:
    try:
        t.connect(timeout_s=2)
        return True
    except (TransportError, OSError):
        return False


def test_password_hashes_match_mosquitto_passwd(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "alice", "s3cret pass"], check=True)
    theirs = passwd.read_text().strip().split(":", 1)[1]
    assert check_password(theirs, "s3cret pass") and not check_password(theirs, "s3cret")
    ours = hash_password("s3cret pass", salt=bytes(12))
    assert ours.startswith("$7$101$AAAAAAAAAAAAAAAA$") and check_password(ours, "s3cret pass")
    assert not check_password("$6$garbage", "x") and not check_password("$7$101$!!$!!", "x")


def test_device_accounts_are_added_and_reserved_names_refused(tmp_path: Path) -> None:
    broker = SecureBroker(tmp_path, FLEET, ["dev-a"])
    d = broker.dir
    add_device(d.root, "dev-a", "second")  # replaces, never duplicates
    lines = d.passwd.read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["fedge-hub", "fedge-operator", "dev-a"]
    assert check_password(lines[2].split(":", 1)[1], "second")
    assert stat.S_IMODE(d.passwd.stat().st_mode) == 0o600
    for bad in ("fedge-hub", "fedge-operator", "a/b", "#"):
        with pytest.raises(ConfigError) as err:
            add_device(d.root, bad, "x")
        assert err.value.field == "device_id"
    with pytest.raises(ConfigError, match="not a fleet folder"):
        add_device(tmp_path, "dev-b", "x")


def test_provision_into_a_fleet_gives_an_account_the_ca_and_the_hub_key(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from fedge.edge_agent.config import load_config as load_agent_config

    d = SecureBroker(tmp_path, FLEET, []).dir
    base = ["devices", "provision", "--profile", "rpi5", "--data", "/data/x.npz", "--out", str(tmp_path / "b"),
            "--fleet-dir", str(d.root)]
    assert main([*base, "--device-id", "pi-01", "--fleet", FLEET]) == 0
    first = capsys.readouterr()
    bundle = Path(first.out.strip())
    assert "added to" in first.err and "mosquitto.pid" in first.err
    assert (bundle / "ca.crt").read_bytes() == d.ca_cert.read_bytes()
    assert (bundle / "hub-signing.pub").read_bytes() == d.signing_pub.read_bytes()
    cfg = load_agent_config(bundle / "agent.toml")
    assert cfg.hub_public_key == bundle / "hub-signing.pub"  # pinned: the agent acts only on the hub's signed frames
    assert cfg.broker.url == read_toml(d.meta)["broker_url"] and cfg.broker.url.startswith("mqtts://")
    assert cfg.broker.ca_file == str(bundle / "ca.crt") and cfg.broker.username == "pi-01"
    passwd = dict(line.split(":", 1) for line in d.passwd.read_text().splitlines())
    assert check_password(passwd["pi-01"], cfg.broker.password or "")
    assert (bundle / "credentials.txt").read_text() == f"pi-01:{cfg.broker.password}\n"

    assert main([*base, "--device-id", "pi-01", "--fleet", FLEET]) == 0  # again: a new password, said loudly
    assert "REPLACED" in capsys.readouterr().err
    assert main([*base, "--device-id", "pi-02", "--fleet", "other"]) == 2  # the folder is another fleet's
    assert main([*base, "--device-id", "fedge-hub", "--fleet", FLEET]) == 2  # the hub's account
    assert "fedge-hub" in capsys.readouterr().err
    assert [line.split(":")[0] for line in d.passwd.read_text().splitlines()] == ["fedge-hub", "fedge-operator",
                                                                                  "pi-01"]
    assert main(["devices", "provision", "--profile", "rpi5", "--data", "/x", "--device-id", "pi-03", "--fleet",
                 FLEET]) == 2  # neither --broker nor --fleet-dir



def test_a_fleet_bundle_carries_the_ca_and_the_hub_key_onto_the_device(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from fedge.devices.flash import STAGE, flash

    d = SecureBroker(tmp_path, FLEET, []).dir
    assert main(["devices", "provision", "--profile", "rpi5", "--data", "/data/x.npz", "--out", str(tmp_path / "b"),
                 "--fleet-dir", str(d.root), "--device-id", "pi-01", "--fleet", FLEET]) == 0
    bundle = Path(capsys.readouterr().out.strip())
    calls: list[list[str]] = []

    def ssh(cmd: list[str], capture: bool) -> tuple[int, str]:
        calls.append(cmd)
        return 0, "/tmp/tmp.Xb3kQ9\n" if capture else ""

    copy = flash(bundle, "pi@10.0.0.9", run=ssh)[1]
    assert {"ca.crt", "hub-signing.pub"} <= {Path(f).name for f in copy[copy.index("--") + 1:-1]}
    root = tmp_path / "rootfs"
    root.mkdir()
    flash(bundle, str(root))
    stage = root / STAGE.lstrip("/")
    assert (stage / "ca.crt").read_bytes() == d.ca_cert.read_bytes()
    assert (stage / "hub-signing.pub").read_bytes() == d.signing_pub.read_bytes()
    script = (bundle / "install.sh").read_text()  # the installer puts them beside agent.toml, which names ca.crt
    assert 'install -m 644 -- "$here/$public" "$install_dir/$public"' in script
    assert read_toml(bundle / "agent.toml")["broker"]["ca_file"] == "ca.crt"

# -- a real broker from the generated files -------------------------------------------------------------------
@pytest.fixture
def secure(tmp_path: Path) -> Iterator[SecureBroker]:
    broker = SecureBroker(tmp_path, FLEET, ["dev-a", "dev-b"]).start()
    try:
        yield broker
    finally:
        broker.stop()


def _connect(broker: SecureBroker, account: str, name: str, **changes: str | None) -> MqttTransport:
    t = MqttTransport(broker.config(account, **changes), f"{name}-{os.getpid()}", session_expiry_s=0)
    t.connect(timeout_s=10)
    return t


class Inbox:
    """Messages received by one client, for waiting on and asserting what never arrived."""

    def __init__(self) -> None:
        self.got: list[str] = []
        self.cond = threading.Condition()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self.cond:
            self.got.append(f"{topic} {payload.decode()}")
            self.cond.notify_all()

    def wait(self, item: str) -> list[str]:
        with self.cond:
            assert self.cond.wait_for(lambda: item in self.got, 10), f"{item!r} never arrived; got {self.got}"
            return list(self.got)


def _raw(broker: SecureBroker, account: str | None, *, ca: bool = True) -> tuple[mqtt.Client, queue.Queue[str]]:
    """A bare MQTT 5 paho client (``account`` None: no user name at all) whose events land in the queue."""
    events: queue.Queue[str] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-{account}-{os.getpid()}", protocol=mqtt.MQTTv5)
    if account is not None:
        table = broker.table(account)
        client.username_pw_set(table["username"], table["password"])
    client.tls_set(ca_certs=str(broker.dir.ca_cert) if ca else None)
    client.on_connect = lambda _c, _u, _f, reason, _p: events.put(f"connect: {reason}")
    client.on_publish = lambda _c, _u, _m, reason, _p: events.put(f"puback: {reason}")
    client.reconnect_delay_set(min_delay=5, max_delay=5)
    return client, events


def _publish_as(broker: SecureBroker, account: str, topic: str) -> str:
    """The broker's PUBACK reason for one QoS 1 message of ``account`` on ``topic``."""
    client, events = _raw(broker, account)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        assert events.get(timeout=10) == "connect: Success"
        client.publish(topic, b"forged", qos=1)
        return events.get(timeout=10)
    finally:
        client.disconnect()
        client.loop_stop()


def test_a_device_publishes_only_as_itself(secure: SecureBroker) -> None:
    t = Topics(FLEET)
    hub = _connect(secure, "hub", "hub")
    seen = Inbox()
    for topic in (t.update_all, t.presence_all, t.decline_all, f"{t.base}/control/#", f"{t.base}/model/#"):
        hub.subscribe(topic, seen)
    try:
        # the broker refuses each of these (mosquitto 2.0.11 answers PUBACK 0x87 and closes the connection)
        for topic in (t.update("dev-b"), t.presence("dev-b"), t.decline("dev-b"), t.control_round_start,
                      t.model_full, t.model_head, "fedge/other-fleet/update/dev-a"):
            assert _publish_as(secure, "dev-a", topic) == "puback: Not authorized", topic
        assert _publish_as(secure, "operator", t.control_round_start) == "puback: Success"
        assert _publish_as(secure, "operator", t.model_full) == "puback: Not authorized"
        a = _connect(secure, "dev-a", "dev-a")
        a.publish(t.presence("dev-a"), b"mine")
        a.publish(t.update("dev-a"), b"mine")
        got = seen.wait(f"{t.update('dev-a')} mine")
        a.close()
        assert got == [f"{t.control_round_start} forged", f"{t.presence('dev-a')} mine", f"{t.update('dev-a')} mine"]
    finally:
        hub.close()


def test_a_device_reads_only_its_own_inbox(secure: SecureBroker) -> None:
    t = Topics(FLEET)
    hub = _connect(secure, "hub", "hub")
    a_seen, b_seen = Inbox(), Inbox()
    a = MqttTransport(secure.config("dev-a"), f"dev-a-{os.getpid()}", session_expiry_s=0)
    for topic in (t.device_inbox("dev-b"), f"{t.base}/device/+/ack", f"{t.base}/#", t.update_all):
        a.subscribe(topic, a_seen)
    a.connect()
    b = MqttTransport(secure.config("dev-b"), f"dev-b-{os.getpid()}", session_expiry_s=0)
    b.subscribe(t.device_inbox("dev-b"), b_seen)
    b.connect()
    try:
        hub.publish(t.reject("dev-b"), b"for-b")
        hub.publish(t.ack("dev-b"), b"for-b")
        b.publish(t.update("dev-b"), b"b-update")
        hub.publish(t.ack("dev-a"), b"for-a")
        hub.publish(t.announce, b"everyone")
        b_seen.wait(f"{t.ack('dev-b')} for-b")
        got = a_seen.wait(f"{t.announce} everyone")
        assert not [m for m in got if "dev-b" in m], got
        assert f"{t.ack('dev-a')} for-a" in got
    finally:
        for c in (a, b, hub):
            c.close()


def _connect_raw(broker: SecureBroker, account: str | None, *, ca: bool = True) -> str:
    """How the broker answers a bare client's CONNECT: the CONNACK reason, or the TLS error."""
    client, events = _raw(broker, account, ca=ca)
    try:
        client.connect("127.0.0.1", broker.port)
    except (OSError, ssl.SSLError) as exc:
        return f"refused: {exc}"
    client.loop_start()
    try:
        return events.get(timeout=10)
    finally:
        client.disconnect()
        client.loop_stop()


@contextlib.contextmanager
def _failed_tls_handshake() -> Iterator[None]:
    """paho 2.2 does not close a socket whose TLS handshake failed (it is dropped unclosed): where that is
    expected, its ResourceWarning is not an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        yield
        gc.collect()


def test_anonymous_wrong_password_and_untrusted_clients_are_refused(secure: SecureBroker) -> None:
    assert _connect_raw(secure, None) == "connect: Not authorized"  # anonymous
    assert _connect_raw(secure, "dev-a") == "connect: Success"
    with pytest.raises(TransportError, match="refused"):
        _connect(secure, "dev-a", "dev-a", password="wrong")
    with pytest.raises(TransportError, match="refused"):
        _connect(secure, "dev-a", "dev-a", username="dev-c")  # a device nobody provisioned
    with _failed_tls_handshake():  # without the fleet's CA (the system's roots): the broker is not trusted
        assert "CERTIFICATE_VERIFY_FAILED" in _connect_raw(secure, "dev-a", ca=False)
        with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):
            _connect(secure, "hub", "hub", ca_file=None)
    with pytest.raises(TransportError):  # plain MQTT on the TLS port
        _connect(secure, "hub", "hub", url=f"mqtt://127.0.0.1:{secure.port}", ca_file=None)
    _connect(secure, "operator", "operator").close()  # the operator's generated login works


def test_a_device_added_while_the_broker_runs_gets_in_after_a_reload(secure: SecureBroker) -> None:
    add_device(secure.dir.root, "dev-c", "late")
    with pytest.raises(TransportError, match="refused"):  # the running broker has not read it yet
        _connect(secure, "dev-a", "dev-c", username="dev-c", password="late")
    assert secure.proc is not None
    secure.proc.send_signal(signal.SIGHUP)  # what the README says to do after provisioning
    assert wait_until(lambda: _connects(secure, "dev-c", "late"), 10)


def _connects(broker: SecureBroker, user: str, password: str) -> bool:
    try:
        _connect(broker, "dev-a", user, username=user, password=password).close()
    except TransportError:
        return False
    return True


def test_a_revoked_device_cannot_reconnect(secure: SecureBroker, capsys: pytest.CaptureFixture[str]) -> None:
    assert _connects(secure, "dev-a", secure.passwords["dev-a"])
    assert main(["devices", "revoke", "--fleet-dir", str(secure.dir.root), "dev-a"]) == 0
    assert "mosquitto.pid" in capsys.readouterr().err
    assert [line.split(":")[0] for line in secure.dir.passwd.read_text().splitlines()] == [
        "fedge-hub", "fedge-operator", "dev-b"]
    assert stat.S_IMODE(secure.dir.passwd.stat().st_mode) == 0o600
    assert secure.proc is not None
    secure.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: not _connects(secure, "dev-a", secure.passwords["dev-a"]), 10)
    with pytest.raises(TransportError, match="refused"):
        _connect(secure, "dev-a", "dev-a")
    assert _connects(secure, "dev-b", secure.passwords["dev-b"])  # the others stay in
    assert main(["devices", "revoke", "--fleet-dir", str(secure.dir.root), "dev-a"]) == 2  # no account any more
    assert main(["devices", "revoke", "--fleet-dir", str(secure.dir.root), "fedge-hub"]) == 2
    assert "fedge-hub" in capsys.readouterr().err


def test_fleet_rotate_key_cli_writes_a_rotation_and_a_new_key(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    d = SecureBroker(tmp_path, FLEET, []).dir
    old_pub = d.signing_pub.read_bytes()
    assert main(["fleet", "rotate-key", "--dir", str(d.root)]) == 0
    assert "hub-key-rotation-1.bin" in capsys.readouterr().out
    assert (d.root / "hub-key-rotation-1.bin").is_file() and d.signing_pub.read_bytes() != old_pub
    assert stat.S_IMODE(d.signing_key.stat().st_mode) == 0o600
