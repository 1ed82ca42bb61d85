# scratchfs — set-up, tests, demo, benchmarks. Run as root on Debian 12+.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := fuse3 libfuse3-dev pkg-config python3-venv python3-dev gcc \
	fio stress-ng gocryptfs cryptsetup-bin libcryptsetup12 e2fsprogs util-linux \
	rsyslog rsyslog-gnutls nmap procps psmisc systemd openssh-server passwd tinyproxy \
	libtss2-dev swtpm swtpm-tools tpm2-tools \
	postgresql postgresql-common
PYTEST_ARGS ?=

.PHONY: all setup apt venv test lint typecheck pytest demo bench loadtest clean

all: test

# Idempotent: apt-get only runs when a package is missing.
apt:
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(VENV)/.stamp-deps: pyproject.toml
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
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

clean:
	rm -rf $(VENV) results .mypy_cache .ruff_cache .pytest_cache
