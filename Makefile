# scratchfs — set-up, tests, demo, benchmarks. Run as root on Debian 12+.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := fuse3 libfuse3-dev pkg-config python3-venv python3-dev gcc \
	fio gocryptfs cryptsetup-bin libcryptsetup12 e2fsprogs util-linux \
	rsyslog rsyslog-gnutls nmap procps psmisc systemd openssh-server passwd \
	libtss2-dev swtpm swtpm-tools tpm2-tools
PYTEST_ARGS ?=

.PHONY: all setup apt venv test lint typecheck pytest demo bench clean

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

clean:
	rm -rf $(VENV) results .mypy_cache .ruff_cache .pytest_cache
