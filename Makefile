# The README's two commands: `make demo` and `make test`. Each installs what it needs first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/.tools/bin:$(PATH)

.PHONY: setup test demo bench scale image build install clean

setup:
	@bash build/setup.sh

test: build
	$(VENV)/bin/pytest -q

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
