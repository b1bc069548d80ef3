# lcm-farm: `make demo` renders images with the built-in tiny model; `make test` runs the suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
INSTALL = $(PIP) install --quiet --constraint constraints.txt

.PHONY: demo test lint install install-test clean browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel

$(VENV)/.worker-installed: $(BIN)/python pyproject.toml constraints.txt
	$(INSTALL) --editable '.[worker]'
	touch $@

$(VENV)/.test-installed: $(BIN)/python pyproject.toml constraints.txt
	$(INSTALL) --editable '.[test]'
	touch $@ $(VENV)/.worker-installed

install: $(VENV)/.worker-installed
install-test: $(VENV)/.test-installed

demo: install
	@$(BIN)/farm generate --model farm/tiny-lcm "a lighthouse at dusk" --num-images 4 --out ./out

lint: install-test
	$(BIN)/ruff check farm tasks models db migrations tests benchmarks
	$(BIN)/mypy

# the playground test drives the system's Chromium (Debian package `chromium`); the JS tests'
# fixture runs `npm ci` in tests/js when its node_modules is missing
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y --no-install-recommends chromium >/dev/null; } || echo "chromium missing: the playground test will say so"

# the fast tests in two processes (pytest-xdist, a test module per process at a time), then the
# fault tests (marked slow: they restart servers and freeze processes) one after another
test: install-test lint browser
	$(BIN)/python -m pytest -m 'not slow' -n 2 --dist loadscope
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
