#!/data/data/com.termux/files/usr/bin/sh
# ~/.termux/boot/fedge-agent: started by Termux:Boot
termux-wake-lock
exec {agent} run --config {config} >> {log} 2>&1
