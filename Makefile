# Two commands for a fresh machine: `make demo` (the main job) and `make test` (set up + every test);
# `make test-fast` is the developers' lane (unit and in-process tests only).
PYTHON ?= python3
VENV := .venv
AGENT_VENV := .venv-agent
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEVICES ?= 5
ROUNDS ?= 5

.PHONY: demo test test-fast setup system-deps agent-venv lint unit agent-env-tests agent-wheels bench bench-readme clean \
	test-aarch64 aarch64-deps

demo: setup
	$(BIN)/fedge demo --devices $(DEVICES) --rounds $(ROUNDS) --out demo-out

test: setup agent-venv lint unit agent-env-tests agent-wheels

# Unit and in-process tests: no mosquitto, no hub/agent/demo processes, no soak (markers: tests/lanes.py).
test-fast: setup
	$(BIN)/pytest -q -m "not e2e and not slow"

# Debian packages: mosquitto and rabbitmq-server (real brokers for the tests: RabbitMQ's MQTT plugin is the
# clusterable one), Fashion-MNIST (offline data set) and headless Chromium with its driver (the dashboard's browser
# test; Debian's build: nothing downloads a browser).
system-deps:
	@if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ] || [ ! -d /usr/share/datasets/fashion-mnist ] \
		|| ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1 \
		|| [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
			mosquitto mosquitto-clients rabbitmq-server dataset-fashion-mnist chromium chromium-driver; \
	fi
	@# the packaged services are not needed: tests and demo start their own brokers (a private RabbitMQ node on
	@# free ports, with its own epmd: hub/rabbitmq.py)
	-@$(SUDO) systemctl disable --now mosquitto >/dev/null 2>&1 || true
	-@$(SUDO) systemctl disable --now rabbitmq-server >/dev/null 2>&1 || true

# Every file of the fedge packages: a strict editable install links files, so a new module needs a relink.
PKG_FILES := $(shell find src protocol edge_agent export hub devices -type f -not -path '*/__pycache__/*' 2>/dev/null)
# One import namespace (fedge.*) mapped onto the repository folders; a strict editable install is a
# link tree of the real files (see ARCHITECTURE.md, "Layout and namespace").
EDITABLE := --config-settings editable_mode=strict
# setuptools ends every strict editable build with an "Editable installation." notice (an InformationOnly
# warning, emitted whatever the configuration: setuptools/command/editable_wheel.py) that pip relays at WARNING
# level; this Python warnings filter drops that one notice in the build backend, nothing else.
NO_EDITABLE_NOTICE := PYTHONWARNINGS="ignore:Editable installation"

setup: system-deps $(VENV)/.linked

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(NO_EDITABLE_NOTICE) $(BIN)/pip install -q -e '.[agent,agent-ort,hub,export,secagg,ray,dev]' $(EDITABLE)
	$(BIN)/pip check
	touch $@

$(VENV)/.linked: $(VENV)/.installed $(PKG_FILES)
	$(NO_EDITABLE_NOTICE) $(BIN)/pip install -q --no-deps -e . $(EDITABLE)
	touch $@

# A second environment with only what a device installs: no TensorFlow, torch or onnx.
agent-venv: $(AGENT_VENV)/.linked

$(AGENT_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(AGENT_VENV)
	$(AGENT_VENV)/bin/pip install -q --upgrade pip
	$(NO_EDITABLE_NOTICE) $(AGENT_VENV)/bin/pip install -q -e '.[agent]' 'pytest>=8' 'hypothesis>=6.100' $(EDITABLE)
	touch $@

$(AGENT_VENV)/.linked: $(AGENT_VENV)/.installed $(PKG_FILES)
	$(NO_EDITABLE_NOTICE) $(AGENT_VENV)/bin/pip install -q --no-deps -e . $(EDITABLE)
	touch $@

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest -q

# The agent's tests in the agent-only venv, against artifacts exported in the full one.
# A Keras MobileNetV2 (float and int8) too: the device trains a real backbone without TensorFlow.
agent-env-tests: setup agent-venv
	rm -rf build/agent-artifacts build/agent-mobilenet build/agent-mobilenet-int8
	$(BIN)/python -c "from fedge.export.testing import export_small; export_small('build/agent-artifacts')"
	$(BIN)/python -c "from fedge.export.testing import export_mobilenet as e; e('build/agent-mobilenet'); \
		e('build/agent-mobilenet-int8', quantize='int8')"
	FEDGE_AGENT_ENV=1 FEDGE_ARTIFACTS=$(CURDIR)/build/agent-artifacts \
		FEDGE_MOBILENET_ARTIFACTS=$(CURDIR)/build/agent-mobilenet \
		FEDGE_MOBILENET_INT8_ARTIFACTS=$(CURDIR)/build/agent-mobilenet-int8 \
		$(AGENT_VENV)/bin/pytest -q -p no:cacheprovider tests/agent -m "not full_env"

# fedge[agent] must install from wheels alone on a Raspberry Pi (aarch64, Python 3.11): no compiler there.
agent-wheels: setup
	$(BIN)/python .ci/agent_wheels.py

# The agent on an emulated Raspberry Pi (arm64 Debian 12 under qemu-system-aarch64): see .ci/aarch64/lane.py and
# docs/AARCH64.md. The guest image is built once (about 19 min) and cached in ~/.cache/fedge/aarch64 (or
# $$FEDGE_AARCH64_CACHE), keyed by its inputs; a run with the image cached takes about 11 min. Not part of `make test`.
test-aarch64: setup aarch64-deps
	$(SUDO) $(BIN)/python .ci/aarch64/lane.py

# What the lane needs on the host: QEMU (system and user mode, with binfmt_misc; qemu-img), debootstrap, e2fsprogs.
aarch64-deps:
	@if ! command -v qemu-system-aarch64 >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1 \
		|| [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
			qemu-system-arm qemu-utils qemu-user-static binfmt-support debootstrap e2fsprogs; \
	fi

bench: setup
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/round_overhead.py
	$(BIN)/python bench/privacy_utility.py
	$(BIN)/python bench/transfer_quality.py
	$(BIN)/python bench/robust_strategy.py
	$(BIN)/python bench/attacks.py
	$(BIN)/python bench/secagg.py
	$(BIN)/python bench/compression.py
	$(BIN)/python bench/async_rounds.py
	$(BIN)/python bench/scale.py

# Run every bench and write the README's benchmark table from that run.
bench-readme: setup
	$(BIN)/python bench/readme_table.py

clean:
	rm -rf $(VENV) $(AGENT_VENV) build demo-out .pytest_cache .mypy_cache .ruff_cache
