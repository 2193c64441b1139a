#!/data/data/com.termux/files/usr/bin/sh
# ~/.termux/boot/fedge-agent: started by Termux:Boot
termux-wake-lock
exec {install_dir}/venv/bin/fedge-agent run --config {install_dir}/agent.toml >> {install_dir}/agent.log 2>&1
