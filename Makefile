# Common tasks.  `make run` and `make test` are the two commands README.md promises.
PYTHON ?= python3
VENV ?= .venv
PY = $(VENV)/bin/python

.PHONY: venv run test test-deps bench profile lint clean soak

# pip builds the optional compiled framing scanner (setup.py) in place; a change to its .pyx
# rebuilds it here.
$(VENV)/.stamp: setup.cfg pyproject.toml setup.py pgdoorman/protocol/_cframing.pyx
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.stamp

# Start a throwaway PostgreSQL 15 cluster and pgdoorman in front of it (foreground).
run: venv
	$(PY) tools/demo.py

# Drivers for tests/test_prepared_drivers.py and Patroni/etcd for the patroni_proxy tests
# (apt, npm, pip; needs root for apt-get).
test-deps: venv
	sh tools/test-deps.sh $(VENV)
	sh tools/patroni-deps.sh

# tests/test_framing.py tests both scanners and, with PGDOORMAN_REQUIRE_COMPILED=1, fails if
# `make venv` did not build the compiled one (or it is older than its .pyx).  The rest of the
# suite runs on the compiled one; PGDOORMAN_PURE_PYTHON=1 make test runs it on the reference.
test: venv test-deps
	PGDOORMAN_REQUIRE_COMPILED=1 $(PY) -m pytest -q tests

# Issue 13's long run: hostile clients beside canaries for PGDOORMAN_SOAK_SECONDS (600), 20
# workers, a fresh seed each time unless PGDOORMAN_HOSTILE_SEED is set (printed on failure).
PGDOORMAN_SOAK_SECONDS ?= 600
soak: venv
	PGDOORMAN_HOSTILE_SECONDS=$(PGDOORMAN_SOAK_SECONDS) \
	PGDOORMAN_HOSTILE_WORKERS=$${PGDOORMAN_HOSTILE_WORKERS:-20} \
	PGDOORMAN_HOSTILE_SEED=$${PGDOORMAN_HOSTILE_SEED:-$$(date +%s)} \
	$(PY) -m pytest -q tests/test_hostile.py

bench: venv
	$(PY) bench/run.py

# py-spy flame graphs of pgdoorman under pgbench load in .tmp/profile (bench/README.md).
profile: venv
	VENV=$(VENV) sh bench/profile.sh

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache pgdoorman/protocol/_cframing.*.so

# Packages (issue 8): each installs its own build dependencies with apt-get when missing.
.PHONY: docs deb rpm test-packages
docs: venv
	$(PY) -m pgdoorman generate --reference --markdown > docs/configuration.md

deb:
	sh packaging/build-deb.sh

rpm:
	sh packaging/build-rpm.sh

# The slow proof: build the .deb, install it into a fresh debootstrap'ed Debian 12, run it.
test-packages: venv
	PGDOORMAN_PACKAGE_TESTS=1 $(PY) -m pytest -q tests/test_packaging.py
