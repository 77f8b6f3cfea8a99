# Two commands do everything on a fresh Debian machine (as root, or with sudo):
#   make run    a simulated 3-participant federation on the bundled digits
#   make test   the test suite (unit + integration against a real Mosquitto)
# Both set up what they need first and skip that quickly when already done.
# `make bench` (set up the same way) measures every benchmark figure against its
# baseline and writes bench/results.json (README, Benchmarks).

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.grbfl-installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# torchvision from PyPI only imports beside the torch it was built for.
ARCH := $(shell uname -m)
ifeq ($(ARCH),aarch64)
TORCH := torch==2.9.1 torchvision==0.24.1
else
TORCH := torch==2.14.1 torchvision==0.29.1
endif

.PHONY: run test setup system-packages lint bench clean

setup: system-packages $(STAMP)

# Any one piece missing installs them all: the clients (mosquitto_sub), the broker
# (outside a normal user's PATH on Debian), venv with ensurepip, and what the
# systemd-python extra compiles with.
system-packages:
	@if ! command -v mosquitto_sub >/dev/null 2>&1 \
	   || { ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; } \
	   || ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1 \
	   || ! command -v gcc >/dev/null 2>&1 \
	   || ! dpkg -s libsystemd-dev pkg-config python3-dev >/dev/null 2>&1; then \
	  echo "installing mosquitto, python3-venv, gcc, python3-dev and libsystemd-dev from the distribution"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	    mosquitto mosquitto-clients python3-venv python3-pip python3-dev \
	    gcc pkg-config libsystemd-dev; \
	fi

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev,systemd]'
	touch $(STAMP)

run: setup
	$(VENV)/bin/grbfl simulate --participants 3 --rounds 5 --json results/digits-grbfl.json

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check daemon tests bench
	$(VENV)/bin/mypy

bench: setup
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
