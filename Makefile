# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both are idempotent: a second run only re-installs when pyproject.toml changed.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.visiond-installed
DEPS_STAMP := $(VENV)/.system-deps-ok

.PHONY: demo test test-fast bench deps venv clean lint

demo: venv
	$(PY) tools/demo.py

test: venv lint
	$(PY) -m pytest -q

# After every change: no visiond children, no training, no RTSP, no browser (tests/tiers.py).
test-fast: venv
	$(PY) -m pytest -q -m "not slow"

lint: venv
	$(VENV)/bin/lint-imports --no-logo
	$(VENV)/bin/ruff check .

bench: venv
	$(VENV)/bin/visiond bench --json bench.json

deps: $(DEPS_STAMP)

$(DEPS_STAMP): tools/install-system-deps.sh
	sh tools/install-system-deps.sh
	@mkdir -p $(VENV) && touch $@

venv: deps $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,tflite]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo-out
