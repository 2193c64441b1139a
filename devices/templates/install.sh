#!/bin/sh
# Installs the fedge agent into {install_dir} on the device. Run on the device from the bundle folder.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "{install_dir}"
cp "$here/agent.toml" "{install_dir}/agent.toml"
chmod 600 "{install_dir}/agent.toml"
python3 -m venv "{install_dir}/venv"
if ls "$here"/*.whl >/dev/null 2>&1; then
  "{install_dir}/venv/bin/pip" install "$(ls "$here"/*.whl | head -n 1)[{extras}]"
else
  "{install_dir}/venv/bin/pip" install "fedge[{extras}]"
fi
"{install_dir}/venv/bin/fedge-agent" version
{service_install}
