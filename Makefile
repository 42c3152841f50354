# Set-up and entry points. `make demo` and `make test` each do all set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.robustlens-installed
SAMPLE_WS := workspaces/sample
HOST ?= 127.0.0.1
PORT ?= 8501

.PHONY: setup demo test lint sample-workspace browser postgresql clean bench

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "robustlens needs Python >= 3.11")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# constraints.txt pins torch to the CPU build on local disk (no multi-GB CUDA download).
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	$(PY) -m pip install --quiet --no-deps torchattacks==3.5.1
	touch $(STAMP)

setup: $(STAMP)

$(SAMPLE_WS)/workspace.json: $(STAMP) sample_data/labels.csv sample_data/predictions.csv sample_data/model.pt sample_data/model.json
	$(VENV)/bin/robustlens init $(SAMPLE_WS) --force --data sample_data --labels sample_data/labels.csv \
		--predictions cnn=sample_data/predictions.csv --model sample_data/model.pt --model-config sample_data/model.json

# analyze is incremental: a re-run only recomputes what changed, so it runs on every demo.
# The robustness run is lighter than the default so the demo starts in minutes: AutoAttack standard and the fast
# validity diagnostics on 40 attacked samples (wider intervals than the default 200), 10 verified samples;
# skipped when nothing changed. `robustlens robustness WS` alone runs the full-strength defaults.
sample-workspace: $(SAMPLE_WS)/workspace.json
	$(VENV)/bin/robustlens analyze $(SAMPLE_WS)
	$(VENV)/bin/robustlens robustness $(SAMPLE_WS) --max-samples 300 --attack-samples 40 --smoothing-samples 50 \
		--verify-samples 10 --validity-budget fast

demo: sample-workspace
	$(VENV)/bin/robustlens serve $(SAMPLE_WS) --host $(HOST) --port $(PORT)

# Browser tests drive Debian's Chromium through Playwright (Playwright cannot download browsers here).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "Installing Debian's chromium for the browser tests"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

# The curation database tests start a real PostgreSQL server from Debian's binaries (tests/pg.py).
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
		echo "Installing Debian's postgresql for the curation database tests"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postgresql >/dev/null; }

# Lint and types (configured in pyproject.toml): `ruff format .` rewrites what `--check` refuses.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The fast loop while developing: $(PY) -m pytest -m "not browser and not slow"
test: setup browser postgresql lint
	$(PY) -m pytest

bench: setup
	$(PY) -m pip install --quiet -c constraints.txt -e '.[bench]'
	$(PY) benchmarks/bench_ingest.py
	$(PY) benchmarks/bench_analyze.py --dataset sample
	$(PY) benchmarks/bench_dashboard.py

clean:
	rm -rf $(VENV) workspaces .pytest_cache
