# Two commands set up everything on a fresh Debian 12 host (as root): `make demo`, `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
HVTOOLS := $(VENV)/bin/hvtools
export HVTOOLS_HOME ?= /var/lib/hvtools

.PHONY: host venv image qemu-patched demo test test-fast lint bench clean

host:
	bash scripts/setup-host.sh

$(VENV)/.stamp: pyproject.toml | host
	bash scripts/setup-venv.sh $(VENV)
	touch $@

venv: host $(VENV)/.stamp

image: venv
	$(HVTOOLS) image build

# The patched QEMU (qemu-patches/ on 10.0.2) in $(HVTOOLS_HOME)/qemu/<key>/: ~6-10 min on 2 cores
# the first time, instant when this series is built (scripts/build-qemu is the same command).
qemu-patched: venv
	$(HVTOOLS) qemu build

demo: image
	bash scripts/demo.sh $(HVTOOLS)

lint: venv
	$(VENV)/bin/ruff check hvtools tests bench
	$(VENV)/bin/mypy

test: image lint qemu-patched
	bash scripts/run-tests.sh $(VENV)

test-fast: venv
	$(PY) -m pytest -q tests/unit

bench: image qemu-patched
	$(PY) bench/boot_time.py
	$(PY) bench/batch_translate.py
	$(PY) bench/transport.py
	$(PY) bench/recovery.py
	$(PY) bench/vhost_blk.py
	$(PY) bench/dirty_sets.py
	$(PY) bench/hvt_bounce.py

clean:
	rm -rf $(VENV) build *.egg-info
