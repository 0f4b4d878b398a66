# Two commands set up everything on a fresh Debian 12 host (as root): `make demo`, `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
HVTOOLS := $(VENV)/bin/hvtools
export HVTOOLS_HOME ?= /var/lib/hvtools

.PHONY: host venv image demo test test-fast lint bench clean

host:
	bash scripts/setup-host.sh

$(VENV)/.stamp: pyproject.toml | host
	bash scripts/setup-venv.sh $(VENV)
	touch $@

venv: host $(VENV)/.stamp

image: venv
	$(HVTOOLS) image build

demo: image
	bash scripts/demo.sh $(HVTOOLS)

lint: venv
	$(VENV)/bin/ruff check hvtools tests bench
	$(VENV)/bin/mypy

test: image lint
	bash scripts/run-tests.sh $(VENV)

test-fast: venv
	$(PY) -m pytest -q tests/unit

bench: image
	$(PY) bench/boot_time.py
	$(PY) bench/batch_translate.py
	$(PY) bench/transport.py
	$(PY) bench/recovery.py
	$(PY) bench/vhost_blk.py
	$(PY) bench/dirty_sets.py

clean:
	rm -rf $(VENV) build *.egg-info
