"""``fedge fleet init``: everything a fleet needs to run over TLS with one broker account per participant.

One folder (mode 0700) holds, for one fleet:

| file | what | mode |
|---|---|---|
| ``ca.crt`` / ``ca.key`` | the fleet's certificate authority (EC P-256) | 0644 / 0600 |
| ``server.crt`` / ``server.key`` | the broker's certificate (SAN: broker host, 127.0.0.1, localhost) | 0644 / 0600 |
| ``hub-signing.key`` / ``hub-signing.pub`` | the hub's Ed25519 signing key (PEM: PKCS#8 / SPKI) | 0600 / 0644 |
| ``mosquitto.conf`` | a TLS listener, no anonymous access, the password and ACL files, persistence here | 0644 |
| ``passwd`` | mosquitto password file (``$7$``: PBKDF2-SHA512, what ``mosquitto_passwd`` writes) | 0600 |
| ``acl`` | the hub and operator accounts, ``pattern`` rules with ``%u`` for every device | 0644 |
| ``hub.toml`` / ``operator.toml`` | the hub's config and the operator's broker login (``fedge round start``) | 0600 |
| ``fleet.toml`` | the fleet's id, broker URL and account names (read by ``fedge devices provision``) | 0644 |

Passwords are hashed here with ``hashlib`` (the format of ``mosquitto_passwd``, tested against a real mosquitto)
rather than by running ``mosquitto_passwd -b``, which would put each password on a command line that every
local user can read in ``/proc``. ``cryptography`` (the ``hub`` extra) is imported only inside the functions.
"""

from __future__ import annotations

import base64
import datetime as dt
import getpass
import hashlib
import hmac
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from fedge.protocol.errors import ConfigError
from fedge.protocol.fsio import write_atomic
from fedge.protocol.tomlfile import dumps_toml, read_toml
from fedge.protocol.topics import RESERVED_IDS, Topics, valid_id

HUB_USER: Final = "fedge-hub"
OPERATOR_USER: Final = "fedge-operator"
RESERVED_USERS: Final = frozenset({HUB_USER, OPERATOR_USER})
PBKDF2_ITERATIONS: Final = 101  # mosquitto_passwd's default for $7$
_SALT_BYTES: Final = 12


@dataclass(frozen=True)
class FleetDir:
    """The files of one fleet folder (see the module docstring); :meth:`read` checks the folder was initialised."""

    root: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    signing_key: Path
    signing_pub: Path
    mosquitto_conf: Path
    passwd: Path
    acl: Path
    hub_toml: Path
    operator_toml: Path
    meta: Path
    data: Path

    @classmethod
    def at(cls, root: str | Path) -> FleetDir:
        r = Path(root).resolve()
        return cls(r, r / "ca.crt", r / "ca.key", r / "server.crt", r / "server.key", r / "hub-signing.key",
                   r / "hub-signing.pub", r / "mosquitto.conf", r / "passwd", r / "acl", r / "hub.toml",
                   r / "operator.toml", r / "fleet.toml", r / "mosquitto-data")

    def read(self) -> dict[str, Any]:
        """``fleet.toml``: ``fleet``, ``broker_url``, ``hub_user``, ``operator_user``."""
        if not self.meta.is_file():
            raise ConfigError("fleet_dir", f"{self.root} is not a fleet folder (no fleet.toml): run fedge fleet init")
        meta = read_toml(self.meta, "fleet_dir")
        for key in ("fleet", "broker_url"):
            if not isinstance(meta.get(key), str):
                raise ConfigError("fleet_dir", f"{self.meta} has no {key}")
        return meta


def write_private(path: Path, data: str | bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` with ``mode`` from the first byte, durably and atomically."""
    write_atomic(path, data.encode() if isinstance(data, str) else data, mode)


# -- password file ------------------------------------------------------------------------------------------
def hash_password(password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """A mosquitto ``$7$`` hash: ``$7$<iterations>$<base64 salt>$<base64 PBKDF2-SHA512(password, salt)>``."""
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password(hashed: str, password: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash (as written by :func:`hash_password` or ``mosquitto_passwd``)."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "7" or not parts[2].isdigit():
        return False
    try:
        salt, want = base64.b64decode(parts[3], validate=True), base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    return hmac.compare_digest(hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2])), want)


def set_password(passwd: Path, user: str, password: str) -> None:
    """Add ``user`` to the password file or replace its password (the broker reads it on start and SIGHUP)."""
    if not valid_id(user) and user not in RESERVED_USERS:
        raise ConfigError("device_id", f"{user!r} must be 1-64 characters of [A-Za-z0-9_-]")
    kept = [line for name, line in password_entries(passwd).items() if name != user]
    _write_passwd(passwd, "\n".join([*kept, f"{user}:{hash_password(password)}"]) + "\n")


def _write_passwd(passwd: Path, text: str) -> None:
    """Rewrite the password file (atomically, 0600) keeping its owner: the broker, running as its unprivileged user,
    re-reads it on SIGHUP and stops if it cannot."""
    owner = passwd.stat() if passwd.exists() else None
    write_private(passwd, text)
    if owner is not None and os.geteuid() == 0 and (owner.st_uid, owner.st_gid) != (0, 0):
        os.chown(passwd, owner.st_uid, owner.st_gid)


def password_entries(passwd: Path) -> dict[str, str]:
    """The password file's lines by account name, in file order (empty when the file does not exist)."""
    lines = passwd.read_text(encoding="utf-8").splitlines() if passwd.exists() else []
    return {line.split(":", 1)[0]: line for line in lines if line}


# -- broker configuration -----------------------------------------------------------------------------------
def acl_text(fleet: str) -> str:
    """The ACL file: the hub owns the fleet's tree, the operator writes ``control/``, and every other account
    (a device: user name = device id) publishes only under its own id and reads only its own inbox."""
    t = Topics(fleet)
    device_rules = [
        f"write {t.base}/update/%u", f"write {t.base}/presence/%u", f"write {t.base}/decline/%u",
        f"write {t.base}/select/%u", f"write {t.base}/secagg/%u", f"read {t.base}/device/%u/#",
        f"read {t.announce}", f"read {t.model_head}", f"read {t.model_full}", f"read {t.result}",
        f"read {t.hub_status}", f"read {t.select_announce}", f"read {t.candidate_all}", f"read {t.base}/hub/key/+",
    ]
    return "\n".join([
        f"# fedge fleet {fleet}: broker access rules (mosquitto acl_file)",
        f"user {HUB_USER}",
        f"topic readwrite {t.base}/#",
        "",
        f"user {OPERATOR_USER}",
        f"topic write {t.base}/control/#",
        f"topic read {t.control_round_reply}",
        f"topic read {t.control_round_result}",
        f"topic read {t.hub_status}",
        f"topic read {t.result}",
        "",
        "# every account, devices included (%u = the account's user name, which is the device id); mosquitto warns",
        "# about the pattern lines without %u: they are the hub topics every device reads",
        *(f"pattern {rule}" for rule in device_rules),
        "",
    ])


def mosquitto_conf(d: FleetDir, port: int, bind: str | None = None, user: str | None = None) -> str:
    """mosquitto 2.x config: one TLS listener, password + ACL files, persistence in the fleet folder, and none of
    mosquitto's message-dropping defaults."""
    return "\n".join([
        "# fedge fleet broker (written by fedge fleet init): mosquitto -c mosquitto.conf",
        f"listener {port}{'' if bind is None else ' ' + bind}",
        f"cafile {d.ca_cert}",
        f"certfile {d.server_cert}",
        f"keyfile {d.server_key}",
        "tls_version tlsv1.2",
        "# the client id is the account's user name: nobody can knock a device (or the hub) off by taking its id",
        "use_username_as_clientid true",
        "allow_anonymous false",
        f"password_file {d.passwd}",
        f"acl_file {d.acl}",
        "# started as root, mosquitto drops to this user (never root: fedge fleet init run as root picks the",
        "# unprivileged account mosquitto, else nobody, and hands it the files the broker reads or writes)",
        f"user {user or default_broker_user()}",
        "persistence true",
        f"persistence_location {d.data}/",
        "# reload after provisioning or revoking a device: kill -HUP \"$(cat <this folder>/mosquitto.pid)\"",
        f"pid_file {d.root / 'mosquitto.pid'}",
        "autosave_interval 60",
        "max_queued_messages 0",
        f"max_queued_bytes {1 << 30}",
        "max_inflight_messages 0",
        "log_dest stderr",
        "",
    ])


def default_broker_user() -> str:
    """Whom the broker runs as by default: the user writing the fleet folder, unless that is root; then an
    unprivileged account (``mosquitto``, which Debian's package creates, else ``nobody``)."""
    if os.geteuid() != 0:
        return _owner()
    import pwd

    for name in ("mosquitto", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise ConfigError("broker_user", "fedge fleet init runs as root and finds no unprivileged account (mosquitto, "
                      "nobody) for the broker: create one, or name one with --broker-user")


def _unreachable(folder: Path, uid: int, gid: int) -> Path | None:
    """The first folder on the way to ``folder`` that user ``uid`` (group ``gid``) may not pass through."""
    for parent in reversed([folder, *folder.parents]):
        if not parent.exists():
            return None  # created by init, passable (0711 / 0700 of the same owner is checked after)
        st = parent.stat()
        bit = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
        if not st.st_mode & bit:
            return parent
    return None


def _hand_to_broker(d: FleetDir, user: str) -> None:
    """Run as root for a broker that drops to ``user``: give it what it reads or writes after dropping privileges
    (its key, the password file it re-reads on SIGHUP, the persistence folder, the pid file) and let it into the
    folder (0711: it cannot list it; every other file stays root's alone)."""
    if os.geteuid() != 0 or user == "root":
        return
    import pwd

    account = pwd.getpwnam(user)
    pid = d.root / "mosquitto.pid"
    if not pid.exists():
        write_private(pid, b"", 0o644)
    d.root.chmod(0o711)
    for path in (d.server_key, d.passwd, d.data, pid):
        os.chown(path, account.pw_uid, account.pw_gid)


def _check_broker_user(root: Path, user: str) -> None:
    """ConfigError unless the broker, dropping to ``user``, can reach the fleet folder."""
    if os.geteuid() != 0 or user == "root":
        return
    import pwd

    try:
        account = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError("broker_user", f"no account named {user!r}") from None
    blocked = _unreachable(root, account.pw_uid, account.pw_gid)
    if blocked is not None:
        raise ConfigError("dir", f"the broker runs as the unprivileged user {user!r}, which cannot pass through "
                          f"{blocked} (mode {blocked.stat().st_mode & 0o777:o}): put the fleet folder where it can "
                          "(e.g. under /srv or /etc), or give the folder its own --broker-user")


def _owner() -> str:
    """The name of the user who owns the files written now (the effective user, whatever $USER says)."""
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):  # no pwd module (Windows) or a uid without a name
        return getpass.getuser()


# -- keys and certificates ----------------------------------------------------------------------------------
def _certificates(d: FleetDir, fleet: str, host: str, days: int) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fedge fleet {fleet} CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(ca_ski, critical=False)
          .sign(ca_key, hashes.SHA256()))
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    try:
        extra: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        extra = x509.DNSName(host)
    if extra not in names:
        names.insert(0, extra)
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
              .issuer_name(ca_name).public_key(server_key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(now)
              .not_valid_after(now + dt.timedelta(days=days))
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                           data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                           crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .add_extension(x509.SubjectAlternativeName(names), critical=False)
              .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
              .sign(ca_key, hashes.SHA256()))
    pem, pkcs8, none = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    write_private(d.ca_key, ca_key.private_bytes(pem, pkcs8, none))
    write_private(d.server_key, server_key.private_bytes(pem, pkcs8, none))
    write_private(d.ca_cert, ca.public_bytes(pem), 0o644)
    write_private(d.server_cert, server.public_bytes(pem), 0o644)


def _signing_key(d: FleetDir) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    _write_signing_key(d, Ed25519PrivateKey.generate())


def _write_signing_key(d: FleetDir, key: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    pem = serialization.Encoding.PEM
    write_private(d.signing_key, key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    write_private(d.signing_pub, key.public_key().public_bytes(pem, serialization.PublicFormat.SubjectPublicKeyInfo),
                  0o644)


# -- the whole folder ---------------------------------------------------------------------------------------
def _broker_url(host: str, port: int) -> str:
    try:
        is_v6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        is_v6 = False
    return f"mqtts://{f'[{host}]' if is_v6 else host}:{port}"


def init_fleet(fleet: str, directory: str | Path, *, broker_host: str = "localhost", port: int = 8883,
               bind: str | None = None, artifacts: str = "artifacts",
               days: int = 3650, broker_user: str | None = None) -> FleetDir:
    """Create the fleet folder (see the module docstring) and return it. Refuses a folder that already holds a
    fleet: a new CA would lock out every provisioned device. ``broker_user``: whom mosquitto drops to when started
    as root (default :func:`default_broker_user`: never root); run as root, the files the broker needs after dropping
    privileges are handed to that user, and a folder it cannot reach is refused."""
    Topics(fleet)  # ConfigError on a bad fleet id
    if not 1 <= port <= 65535:
        raise ConfigError("port", f"must be in [1, 65535], got {port}")
    if not broker_host or any(c in broker_host for c in "/ \t\n#+"):
        raise ConfigError("broker_host", f"{broker_host!r} is not a host name or address")
    d = FleetDir.at(directory)
    if d.meta.exists():
        raise ConfigError("dir", f"{d.root} already holds a fleet ({d.meta}); use another folder")
    user = broker_user or default_broker_user()
    _check_broker_user(d.root, user)
    for folder in (d.root, d.data):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.chmod(0o700)
    url = _broker_url(broker_host, port)
    _certificates(d, fleet, broker_host, days)
    _signing_key(d)
    hub_pw, operator_pw = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    write_private(d.passwd, "")
    set_password(d.passwd, HUB_USER, hub_pw)
    set_password(d.passwd, OPERATOR_USER, operator_pw)
    write_private(d.acl, acl_text(fleet), 0o644)
    write_private(d.mosquitto_conf, mosquitto_conf(d, port, bind, user), 0o644)
    hub = {"fleet": fleet, "state_dir": "hub-state", "artifacts": artifacts, "signing_key": str(d.signing_key),
           "broker": {"url": url, "username": HUB_USER, "password": hub_pw, "ca_file": str(d.ca_cert)}}
    write_private(d.hub_toml, dumps_toml(hub, header=(
        f"fedge hub of fleet {fleet} (written by fedge fleet init; every key: docs/CONFIG.md).\n"
        "Set artifacts to the exported model (fedge export), then: fedge hub serve --config hub.toml\n"
        "signing_key: every frame the hub publishes is signed; provisioned devices pin hub-signing.pub")))
    operator = {"fleet": fleet, "broker": {"url": url, "username": OPERATOR_USER, "password": operator_pw,
                                           "ca_file": d.ca_cert.name}}
    write_private(d.operator_toml, dumps_toml(operator, header=(
        f"the operator of fleet {fleet}: fedge round start --fleet {fleet} --broker-config operator.toml\n"
        "relative paths resolve against this file's folder")))
    meta = {"fleet": fleet, "broker_url": url, "hub_user": HUB_USER, "operator_user": OPERATOR_USER}
    write_private(d.meta, dumps_toml(meta, header="fedge fleet folder (fedge fleet init)"), 0o644)
    _hand_to_broker(d, user)
    return d


def rotate_signing_key(fleet_dir: str | Path) -> Path:
    """Replace the hub's signing key with a new one vouched for by the old one: writes
    ``hub-key-rotation-<n>.bin`` (PROTOCOL.md, "Signatures"; the hub publishes every rotation file beside its key,
    retained, on ``hub/key/<n>``), then the new ``hub-signing.key`` / ``.pub`` (the old key is deleted). Restart the
    hub to sign with the new key; devices move their trust along the chain. Returns the rotation file."""
    from fedge.protocol.signing import KeyRotation, load_private_key, rotation_files

    d = FleetDir.at(fleet_dir)
    fleet = str(d.read()["fleet"])
    old = load_private_key(d.signing_key)
    seq = max((s for s, _ in rotation_files(d.root)), default=0) + 1
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    new = Ed25519PrivateKey.generate()
    path = d.root / f"hub-key-rotation-{seq}.bin"
    rotation = KeyRotation.make(fleet, old, new.public_key(), seq)
    _write_signing_key(d, new)  # the new key first: a rotation must never name a key nobody holds
    write_private(path, rotation, 0o644)
    return path


def add_device(fleet_dir: str | Path, device_id: str, password: str) -> FleetDir:
    """Give ``device_id`` a broker account in the fleet folder's password file (the ACL's ``%u`` patterns already
    cover it). The broker picks it up on its next start or SIGHUP."""
    d = FleetDir.at(fleet_dir)
    d.read()
    if device_id in RESERVED_IDS:
        raise ConfigError("device_id", f"{device_id!r} is reserved: the fleet's hub or operator account, or the "
                          "hub's name in secure aggregation")
    if not valid_id(device_id):
        raise ConfigError("device_id", f"{device_id!r} must be 1-64 characters of [A-Za-z0-9_-]")
    set_password(d.passwd, device_id, password)
    return d


def remove_device(fleet_dir: str | Path, device_id: str) -> FleetDir:
    """Revoke ``device_id``: drop its account from the fleet folder's password file (``ConfigError`` if it has
    none, or names the hub or operator). The running broker refuses its next connection after a SIGHUP."""
    d = FleetDir.at(fleet_dir)
    d.read()
    if device_id in RESERVED_USERS:
        raise ConfigError("device_id", f"{device_id!r} is the name of the fleet's hub or operator account")
    entries = password_entries(d.passwd)
    if entries.pop(device_id, None) is None:
        raise ConfigError("device_id", f"{device_id!r} has no account in {d.passwd}")
    _write_passwd(d.passwd, "".join(f"{line}\n" for line in entries.values()))
    return d


__all__ = [
    "HUB_USER",
    "OPERATOR_USER",
    "RESERVED_USERS",
    "FleetDir",
    "acl_text",
    "add_device",
    "check_password",
    "default_broker_user",
    "hash_password",
    "init_fleet",
    "mosquitto_conf",
    "password_entries",
    "remove_device",
    "rotate_signing_key",
    "set_password",
    "write_private",
]
