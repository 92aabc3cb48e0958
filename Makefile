# The README's two commands: `make demo` and `make test`. Each installs what it needs first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/.tools/bin:$(PATH)

.PHONY: setup test test-unit demo bench scale image build install clean

setup:
	@bash build/setup.sh

# tests/unit runs with every capability dropped, even as root: a unit test that needs one fails there.
UNPRIVILEGED := $(if $(filter 0,$(shell id -u)),setpriv --inh-caps=-all --ambient-caps=-all --bounding-set=-all --no-new-privs --)

test: build test-unit
	$(VENV)/bin/pytest -q tests/ns tests/lab

test-unit: setup
	$(UNPRIVILEGED) $(VENV)/bin/pytest -q tests/unit

demo: build
	$(PY) -m vpclab.demo

bench: build
	$(PY) -m tests.bench.run

scale: build
	$(PY) -m tests.scale.run

image: build
	@bash build/image.sh

build: setup
	@bash build/build.sh

install: build
	@bash build/install.sh

clean:
	rm -rf $(VENV) .tools dist build/work .pytest_cache
