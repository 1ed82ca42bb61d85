# scratchfs — set-up, tests, demo, benchmarks. Run as root on Debian 12+.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := fuse3 libfuse3-dev pkg-config python3-venv python3-dev gcc patch \
	fio stress-ng gocryptfs cryptsetup-bin libcryptsetup12 e2fsprogs util-linux \
	rsyslog rsyslog-gnutls nmap procps psmisc systemd openssh-server passwd tinyproxy \
	libtss2-dev swtpm swtpm-tools tpm2-tools \
	postgresql postgresql-common
# The appliance image and its test bed (issue 20; `make appliance`, `make appliance-test`).
APPLIANCE_PACKAGES := mmdebstrap qemu-system-x86 ovmf dnsmasq-base nftables mtools dosfstools \
	grub-efi-amd64-bin iproute2 fdisk iputils-ping
PYTEST_ARGS ?=

.PHONY: all setup apt apt-appliance apt-install venv test lint typecheck pytest demo bench loadtest clean \
	appliance appliance-test

all: test

# Idempotent: apt-get only runs when a package is missing.
apt:
	@$(MAKE) --no-print-directory apt-install PACKAGES="$(APT_PACKAGES)"

apt-appliance:
	@$(MAKE) --no-print-directory apt-install PACKAGES="$(APPLIANCE_PACKAGES)"

apt-install:
	@missing=""; for p in $(PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# pyfuse3 is PyPI's 3.5.0 plus a fallocate handler and a direct-read request loop
# (third_party/pyfuse3/README.md): the wheel is built once into build/pyfuse3/ and found there by
# pip through --find-links.
$(VENV)/.stamp-deps: pyproject.toml third_party/pyfuse3/fallocate.patch \
		third_party/pyfuse3/direct-read.patch tools/patched_pyfuse3.py
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	wheels=$$($(PY) -m tools.patched_pyfuse3) && $(PY) -m pip install -q --find-links "$$wheels" -e '.[test]'
	@touch $@

venv: apt $(VENV)/.stamp-deps

setup: venv

lint: setup
	$(VENV)/bin/ruff check .

typecheck: setup
	$(VENV)/bin/mypy

pytest: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

demo: setup
	$(PY) -m tools.demo

bench: setup
	$(PY) -m tools.bench

# The issue-14 acceptance runs (minutes each; not part of `make test`, which runs a smoke run).
LOADTEST_APPLIANCES ?= 1000
LOADTEST_DURATION ?= 60
loadtest: setup
	$(PY) -m tools.loadtest --appliances $(LOADTEST_APPLIANCES) --duration $(LOADTEST_DURATION) --backend sqlite
	$(PY) -m tools.loadtest --appliances $(LOADTEST_APPLIANCES) --duration $(LOADTEST_DURATION) \
		--backend postgresql --nodes 2 --pollers 2
	$(PY) -m tools.loadtest --appliances $(LOADTEST_APPLIANCES) --duration $(LOADTEST_DURATION) \
		--backend sqlite --slowloris 256
	$(PY) -m tools.loadtest --appliances $(LOADTEST_APPLIANCES) --duration $(LOADTEST_DURATION) \
		--backend sqlite --attack

# The appliance's raw disk (GPT: ESP with GRUB + kernel + initrd, root, state), rebuilt only
# when an input changed; prints its path (build/appliance.raw). See docs/appliance.md.
appliance: setup apt-appliance
	$(PY) -m tools.appliance.build

# Boots the image under qemu (TCG) with OVMF + swtpm on a bridge in a network namespace and
# checks it from outside (tests/appliance; ~15 min).
appliance-test: appliance
	APPLIANCE_TEST=1 $(PY) -m pytest -p no:cacheprovider -rA tests/appliance $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) results build .mypy_cache .ruff_cache .pytest_cache
