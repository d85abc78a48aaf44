# Two commands on a fresh machine: `make run` and `make test`. Everything they need is installed here,
# into .tools/ (a pinned uv) and .venv/ (the locked dependencies from uv.lock), and action/node_modules.

PYTHON ?= python3
UV_VERSION := 0.13.9
UV := .tools/bin/uv
VENV := .venv
SYNCED := $(VENV)/.synced
NODE_TOOLS := action/node_modules/.installed
GUIDE_TOOLS := bench/guide/node_modules/.installed

# The container image. BASE_IMAGE defaults to one built here from Debian's packages (no registry needed);
# `make image BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm` builds from the official image instead.
VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
IMAGE ?= localhost/auth0-user-sync-relay:$(VERSION)
LOCAL_BASE_IMAGE := localhost/debian-python:bookworm
BASE_IMAGE ?= $(LOCAL_BASE_IMAGE)
CONTAINER_ENGINE ?= $(if $(shell command -v podman),podman,$(if $(shell command -v docker),docker,podman))
# podman on this machine kind needs runc (crun fails on its cgroups) and explicit limits; see Containerfile.
PODMAN := podman --runtime runc
PODMAN_LIMITS := --ulimit nofile=1024:1024 --ulimit nproc=1024:1024
# A TLS-inspecting proxy's CA, mounted for the build's downloads only (never copied into the image).
BUILD_CA := $(or $(SSL_CERT_FILE),$(wildcard /etc/ssl/certs/ca-certificates.crt))

# Debian packages the tests drive for real, as command:package: the gateway (nginx), the alert rules
# (promtool), the image (podman, runc, mmdebstrap). Installed when missing, as `make bench` installs wrk.
TEST_TOOLS := nginx:nginx promtool:prometheus podman:podman runc:runc mmdebstrap:mmdebstrap
IMAGE_TOOLS := podman:podman runc:runc mmdebstrap:mmdebstrap
define install_missing
	@missing=""; for tool in $(1); do command -v $${tool%%:*} >/dev/null || missing="$$missing $${tool#*:}"; \
	done; if [ -n "$$missing" ]; then apt-get update -qq && \
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi
endef

.PHONY: run test lint typecheck test-python test-action test-tools migrate sample deploy-action bench image \
	base-image clean

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

# Test modules run in parallel processes, each module whole in one of them (its relay process and schema
# are module-wide); every process starts its own embedded PostgreSQL.
TEST_WORKERS ?= 3
test-python: $(SYNCED) test-tools
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile

test-tools:
	$(call install_missing,$(TEST_TOOLS))

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

ifeq ($(CONTAINER_ENGINE),docker)
image:
	docker build --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg UV_VERSION=$(UV_VERSION) -t $(IMAGE) \
		-f Containerfile .
else
image: base-image
	$(PODMAN) build --isolation chroot --network host $(PODMAN_LIMITS) --format docker \
		$(if $(BUILD_CA),--volume $(BUILD_CA):/run/build-ca.pem:ro) \
		--build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg UV_VERSION=$(UV_VERSION) -t $(IMAGE) -f Containerfile .
endif

# A minimal Debian with python3, built once and kept in podman's storage (about 40 s, then nothing).
base-image:
	$(call install_missing,$(IMAGE_TOOLS))
ifeq ($(BASE_IMAGE),$(LOCAL_BASE_IMAGE))
	@$(PODMAN) image exists $(BASE_IMAGE) || { \
		folder=$$(mktemp -d) && \
		mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates bookworm \
			$$folder/base.tar && \
		$(PODMAN) import --quiet $$folder/base.tar $(BASE_IMAGE); status=$$?; rm -rf $$folder; exit $$status; }
endif

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
