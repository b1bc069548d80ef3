# lcm-farm: `make demo` renders images with the built-in tiny model; `make test` runs the suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
INSTALL = $(PIP) install --quiet --constraint constraints.txt

.PHONY: demo test lint install install-test clean browser node

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

# the JavaScript tests run fal's npm clients under Node >= 20 with npm: the `nodejs` Debian package from
# NodeSource's repository (it carries npm; Debian 12's own `nodejs` is 18, without npm), installed
# when missing and run as root. Under CI=true a missing or older Node fails here, loudly; elsewhere
# the JavaScript tests skip themselves
node:
	@command -v node >/dev/null || { [ "$$(id -u)" = 0 ] && { apt-get install -y --no-install-recommends nodejs \
	  >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y --no-install-recommends nodejs >/dev/null; }; }; } || true
	@if command -v node >/dev/null && command -v npm >/dev/null \
	  && node -e 'process.exit(+process.versions.node.split(".")[0] >= 20 ? 0 : 1)'; then :; \
	elif [ "$$CI" = true ]; then \
	  echo "CI=true: Node >= 20 with npm is required (the nodejs package from NodeSource); found: $$(node --version 2>/dev/null || echo no node)" >&2; \
	  exit 1; \
	else echo "Node >= 20 with npm not found: the JavaScript tests will skip themselves"; fi

# the fast tests in two processes (pytest-xdist, a test module per process at a time), then the
# fault tests (marked slow: they restart servers and freeze processes) one after another
test: install-test lint browser node
	$(BIN)/python -m pytest -m 'not slow' -n 2 --dist loadscope --durations=30
	$(BIN)/python -m pytest -m slow --durations=10

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
