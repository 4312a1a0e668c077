# Two commands on a fresh machine: `make serve` and `make test` (README.md).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=
# Debian packages the integration tests and benchmarks use (installed only when run as root).
DEB_PACKAGES := knot knot-dnsutils bind9-dnsutils unbound dnsperf nftables iproute2 util-linux

.PHONY: serve test venv deps lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

venv: $(BIN)/python
	$(BIN)/pip install -q -e '.[test,plot]'

serve: venv
	@echo "Resolver on 127.0.0.1:5353 (UDP and TCP). Query it with:"
	@echo "    dig @127.0.0.1 -p 5353 example.com MX"
	@echo "    $(BIN)/resolver query example.com MX --server 127.0.0.1:5353"
	$(BIN)/resolver serve --listen 127.0.0.1:5353 $(ARGS)

# Debian packages: the policy-rc.d guard keeps package scripts from starting knotd/unbound on port 53.
deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	    if [ -n "$$missing" ]; then \
	        [ -e /usr/sbin/policy-rc.d ] || printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; \
	        chmod +x /usr/sbin/policy-rc.d; \
	        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	    fi; \
	else echo "not root: skipping Debian packages ($(DEB_PACKAGES)); tests needing them will skip"; fi

test: deps venv
	$(BIN)/ruff check resolver tests bench
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check resolver tests bench

clean:
	rm -rf $(VENV) build *.egg-info
