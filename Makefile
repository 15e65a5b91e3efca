# edge-ota: two commands do all set-up on a fresh Debian machine.
#   make demo   create .venv, install, run the end-to-end demo on a simulated device
#   make test   install what the tests need (Debian packages too when root), lint, type-check, test

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Debian packages the tests use: real tools we cross-check against or drive.
APT_TEST_PACKAGES := e2fsprogs zstd libubootenv-tool u-boot-tools grub-common grub-emu \
	mosquitto rabbitmq-server systemd xdelta3 bsdiff mtools dosfstools fusefat exfatprogs exfat-fuse fdisk u-boot-qemu qemu-system-arm \
	docker-registry podman skopeo erofs-utils squashfs-tools \
	debootstrap lintian man-db python3-venv qemu-system-x86 grub-pc-bin xorriso
APT_DEMO_PACKAGES := e2fsprogs

.PHONY: demo test venv lint typecheck bench bench-fleet bench-console bench-http bench-delta bench-oci clean apt-test apt-demo bootscripts bytecode fuzz deb install vm vm-test vm-demo reliability soak

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The demo needs only the package; the tests add the test and lint toolchain.
$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed-run

venv: $(VENV)/.installed

apt-test:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		missing=$$(for p in $(APT_TEST_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
		if [ -n "$$missing" ]; then \
			echo "apt: installing $$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
		fi; \
	fi

apt-demo:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v mkfs.ext4 >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_DEMO_PACKAGES) >/dev/null; \
	fi

bootscripts: venv
	@if command -v mkimage >/dev/null; then $(MAKE) -s -C hw/scripts; \
	else echo "mkimage not found (u-boot-tools): hw/scripts/boot.scr not built"; fi

lint: venv
	$(BIN)/ruff check agent bundler hw ota_common tests bench
	$(BIN)/mypy

# The project's bytecode, compiled as the .deb's postinst does: every `ota-agent`
# a test or the demo starts then loads it instead of compiling each module from
# source (which it does at every start where PYTHONDONTWRITEBYTECODE is set).
bytecode: $(BIN)/python
	$(BIN)/python -m compileall -q -j 0 agent bundler hw ota_common bench tests >/dev/null

# The suite runs on TEST_JOBS worker processes (pytest-xdist). `--dist loadfile`
# keeps each file's tests, in order, with their module fixtures in one worker (the
# VM cycle's steps build on each other); tests that build from the checkout or
# into the VM cache wait for each other on host-wide locks (tests/vm/paths.py),
# so nothing depends on how the scheduler groups them.
TEST_JOBS ?= 2

test: apt-test venv bootscripts lint bytecode
	$(BIN)/python -m pytest -n $(TEST_JOBS) --dist loadfile tests

demo: apt-demo $(VENV)/.installed-run bytecode
	$(BIN)/python -m agent.demo

bench: venv
	$(BIN)/python bench/install_vs_dd.py

# The agent idle on a broker, then one deploy to 1000 simulated devices via mosquitto and a 2-node RabbitMQ cluster.
bench-http: venv
	@if ! command -v curl >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends curl >/dev/null; \
	fi
	$(BIN)/python -m bench.http_faults

bench-fleet: venv
	$(BIN)/python -m bench.fleet

# Bundle upload over the serial console: framing efficiency, time at 115200 and 3 Mbaud, throughput over a pty relay.
bench-console: venv
	$(BIN)/python -m bench.console

# Delta bundles against xdelta3, zstd --patch-from, bsdiff and casync on a Debian corpus
# (built into $(CORPUS) by bench/delta_corpus/make-corpus.sh when absent; needs root).
CORPUS ?= bench/corpus
bench-delta: venv
	CORPUS=$(CORPUS) $(BIN)/python -m bench.delta

# Container images into ext4/erofs against tar + mkfs.ext4 -d; bundle bytes pulled from a registry.
bench-oci: venv
	$(BIN)/python bench/oci.py

# Coverage-guided fuzzing (atheris) of every reader of untrusted bytes, FUZZ_SECONDS each.
FUZZ_SECONDS ?= 60
fuzz: venv
	$(BIN)/pip install -q -e '.[test,fuzz]'
	$(BIN)/python -m tests.fuzz.run --seconds $(FUZZ_SECONDS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# One table: crash points (kill and power cut), dropped-write states, hostile bundles, environment
# faults, fuzz executions per target (RELIABILITY_FUZZ_SECONDS each), and the unrecovered count (must be 0).
RELIABILITY_FUZZ_SECONDS ?= 10
reliability: venv
	$(BIN)/pip install -q -e '.[test,fuzz]'
	$(BIN)/python -m tests.reliability.table --fuzz-seconds $(RELIABILITY_FUZZ_SECONDS)

# The same on every bootloader backend, plus >= 500 random kill instants and >= 500 random
# dropped-write states (SOAK_SEED to replay a run; the seed is printed). The soak's tallies
# go to build/reliability/last-soak.json, shown by later `make reliability` tables;
# SOAK_ONLY=kills or SOAK_ONLY=states runs (and replaces) only that part.
SOAK_SEED ?=
SOAK_ONLY ?=
soak: venv
	$(BIN)/pip install -q -e '.[test,fuzz]'
	EDGE_OTA_CRASH_BACKENDS="sim uboot grub bls" $(BIN)/python -m tests.reliability.table --soak \
		--fuzz-seconds $(FUZZ_SECONDS) $(if $(SOAK_SEED),--seed $(SOAK_SEED)) $(if $(SOAK_ONLY),--soak-only $(SOAK_ONLY))

# The Debian package (packaging/build-deb.sh): the agent in its own virtualenv
# under /opt/edge-ota, made by Debian's /usr/bin/python3; lintian when present.
DEB_DIR ?= build/deb
deb:
	sh packaging/build-deb.sh $(DEB_DIR)
	@if command -v lintian >/dev/null; then lintian $(DEB_DIR)/edge-ota_*.deb || true; fi

# For image builders (Yocto, Buildroot; docs/integration.md): the Python
# package into PREFIX's site-packages (no dependencies: the image provides
# paho-mqtt, zstandard, cryptography, tenacity, pyserial), the units, boot
# scripts, docs and example config under DESTDIR.
DESTDIR    ?=
PREFIX     ?= /usr
BINDIR     ?= $(PREFIX)/bin
SYSCONFDIR ?= /etc
UNITDIR    ?= $(PREFIX)/lib/systemd/system
INSTALL_PYTHON ?= $(PYTHON)
install:
	DEB_PYTHON_INSTALL_LAYOUT=deb PIP_BREAK_SYSTEM_PACKAGES=1 $(INSTALL_PYTHON) -m pip install -q --ignore-installed --no-deps --no-compile --no-warn-script-location \
		--root "$(or $(DESTDIR),/)" --prefix "$(PREFIX)" .
	sh packaging/install-data.sh "$(DESTDIR)" "$(PREFIX)" "$(BINDIR)" "$(SYSCONFDIR)" "$(UNITDIR)"

# The virtual device (tests/vm): a Debian bookworm disk image made from Debian
# packages (debootstrap), cached under EDGE_OTA_VM_CACHE (default
# /var/cache/edge-ota-vm) by the hash of its inputs. Needs root.
vm: apt-test venv
	$(BIN)/python -m tests.vm.build

# The update cycle in the VM over its serial console, with 10 power cuts
# (make test runs the same test with VM_POWER_CUTS=1), then the same cycle from
# a USB stick, over MQTT and over a second serial line (only here, not in make
# test). VM_STEPS=usb,mqtt,serial (or 1,2,...) runs some of the steps.
VM_POWER_CUTS ?= 10
VM_STEPS ?= all
vm-test: apt-test venv
	VM_STEPS=$(VM_STEPS) VM_POWER_CUTS=$(VM_POWER_CUTS) $(BIN)/python -m pytest -q -s tests/vm

# Boots the VM and runs the update cycle with its serial console on this terminal.
vm-demo: apt-test venv
	$(BIN)/python -m tests.vm.demo
