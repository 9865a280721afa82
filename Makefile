# Everything runs inside .venv, built from the pinned lock in .ci/constraints.txt.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# Where `make demo` keeps its model and samples, and the ports it serves on.
DEMO_DIR ?= .demo
DEMO_PORT ?= 8500
DEMO_METRICS_PORT ?= 8502

.PHONY: setup demo test lint format generate bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==25.3
	$(PY) -m pip install --quiet -c .ci/constraints.txt -e '.[dev]'
	touch $@

# Train on the default data, serve the model, predict held-out digits, stop.
demo: setup
	@set -eu; \
	rm -rf $(DEMO_DIR); mkdir -p $(DEMO_DIR); \
	$(BIN)/convserve-train --model-base-path $(DEMO_DIR)/models/mnist --save-samples $(DEMO_DIR)/samples.npz; \
	$(BIN)/convserve-server --model-base-path $(DEMO_DIR)/models/mnist \
		--port $(DEMO_PORT) --metrics-port $(DEMO_METRICS_PORT) > $(DEMO_DIR)/server.log 2>&1 & \
	server=$$!; \
	trap 'kill -TERM $$server 2>/dev/null || true' EXIT; \
	echo "server started (pid $$server, log $(DEMO_DIR)/server.log)"; \
	$(BIN)/convserve --target localhost:$(DEMO_PORT) health --wait-s 120; \
	$(BIN)/convserve --target localhost:$(DEMO_PORT) predict $(DEMO_DIR)/samples.npz; \
	kill -TERM $$server; wait $$server; trap - EXIT; \
	echo "server stopped cleanly"

test: setup
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy client/convserve server/convserve trainer/convserve

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

generate: setup
	$(PY) proto/generate.py

# Model throughput in-process, then served throughput through `convserve bench`.
bench: setup
	$(PY) tests/bench.py

clean:
	rm -rf $(DEMO_DIR) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
