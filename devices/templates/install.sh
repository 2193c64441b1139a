#!/bin/sh
# Installs the fedge agent on this device; run it from the bundle folder (as root for a systemd service).
# Written by `fedge devices provision`: every value below is shell-quoted and used only as "$name".
set -eu
install_dir={install_dir}
agent_user={user}
extras={extras}
version={version}
wheel={wheel}
wheel_sha256={wheel_sha256}
backend={backend}

here=$(cd -- "$(dirname -- "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf -- "$work"' EXIT
umask 022

if [ -n "$wheel" ]; then
  # check a private copy: what was checked is what pip installs
  cp -- "$here/$wheel" "$work/$wheel"
  got=$(python3 -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$work/$wheel")
  if [ "$got" != "$wheel_sha256" ]; then
    echo "install.sh: $wheel has sha256 $got, the bundle pins $wheel_sha256: not installing" >&2
    exit 1
  fi
  requirement="$work/$wheel[$extras]"
else
  requirement="fedge[$extras]==$version"
fi

mkdir -p -- "$install_dir/state"
chmod 700 -- "$install_dir/state"
for public in ca.crt hub-signing.pub; do  # a fleet bundle's CA certificate and hub key (agent.toml names them)
  if [ -f "$here/$public" ]; then
    install -m 644 -- "$here/$public" "$install_dir/$public"
  fi
done
if [ -f "$here/agent.toml" ]; then
  install -m 600 -- "$here/agent.toml" "$install_dir/agent.toml"
elif [ ! -f "$install_dir/agent.toml" ]; then
  echo "install.sh: no agent.toml in $here nor in $install_dir" >&2
  exit 1
fi
python3 -m venv -- "$install_dir/venv"
TMPDIR="$work" "$install_dir/venv/bin/pip" install --quiet --no-cache-dir {pip_options}-- "$requirement"
installed=$("$install_dir/venv/bin/python" -c 'from importlib.metadata import version; print(version("fedge"))')
if [ "$installed" != "$version" ]; then
  echo "install.sh: installed fedge $installed, the bundle pins $version" >&2
  exit 1
fi
"$install_dir/venv/bin/fedge-agent" version
# the self-test before the service starts: every installed back-end probed here (each in its own process) with the
# model the fleet runs, compared with the NumPy reference; the configured back-end must work
if [ -f "$here/selftest/manifest.json" ]; then
  if ! "$install_dir/venv/bin/fedge-agent" selftest --probe --backend "$backend" --artifacts "$here/selftest"; then
    echo "install.sh: the self-test failed on this device (above): fedge is installed, the agent is not started" >&2
    exit 1
  fi
else
  echo "install.sh: no model in this bundle (provision with --artifacts): no self-test; the agent probes its" \
    "back-ends when its first model arrives" >&2
fi
{service_install}
