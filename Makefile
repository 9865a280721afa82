# Everything runs inside .venv, built from the pinned lock in .ci/constraints.txt.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# Where `make demo` keeps its model and samples, and the ports it serves on.
DEMO_DIR ?= .demo
DEMO_PORT ?= 8500
DEMO_REST_PORT ?= 8501
DEMO_METRICS_PORT ?= 8502

.PHONY: setup demo test lint format generate bench screenshots clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==25.3
	$(PY) -m pip install --quiet -c .ci/constraints.txt -e '.[dev]'
	$(BIN)/convserve-train --fetch-sample --quiet
	touch $@

# Where Debian's dataset-fashion-mnist package puts Fashion-MNIST.
FASHION_DIR ?= /usr/share/datasets/fashion-mnist

# Train MNIST (default data), Fashion-MNIST (when its Debian package is installed) and
# the 8x8 digits, serve all of them from one server, predict held-out images of each
# (and one MNIST image through TF Serving's REST API with curl), stop. Fashion-MNIST
# trains for DEMO_FASHION_EPOCHS of its default recipe's epochs, to keep the demo near
# five minutes; `make demo DEMO_FASHION_EPOCHS=` trains it in full (three to four minutes more).
DEMO_FASHION_EPOCHS ?= 2
demo: setup
	@set -eu; \
	rm -rf $(DEMO_DIR); mkdir -p $(DEMO_DIR); \
	$(BIN)/convserve-train --model-base-path $(DEMO_DIR)/models/mnist --save-samples $(DEMO_DIR)/mnist.npz; \
	models="--model mnist=$(DEMO_DIR)/models/mnist"; \
	if [ -d $(FASHION_DIR) ]; then \
		$(BIN)/convserve-train --dataset fashion-mnist --model-name fashion \
			$(if $(DEMO_FASHION_EPOCHS),--epochs $(DEMO_FASHION_EPOCHS)) \
			--model-base-path $(DEMO_DIR)/models/fashion --save-samples $(DEMO_DIR)/fashion.npz; \
		models="$$models --model fashion=$(DEMO_DIR)/models/fashion"; \
	else \
		echo "Fashion-MNIST skipped: $(FASHION_DIR) is missing (apt-get install dataset-fashion-mnist)"; \
	fi; \
	$(BIN)/convserve-train --dataset digits8 --model-name digits8 \
		--model-base-path $(DEMO_DIR)/models/digits8 --save-samples $(DEMO_DIR)/digits8.npz; \
	models="$$models --model digits8=$(DEMO_DIR)/models/digits8"; \
	$(BIN)/convserve-server $$models \
		--port $(DEMO_PORT) --rest-port $(DEMO_REST_PORT) --metrics-port $(DEMO_METRICS_PORT) \
		> $(DEMO_DIR)/server.log 2>&1 & \
	server=$$!; \
	trap 'kill -TERM $$server 2>/dev/null || true' EXIT; \
	echo "server started (pid $$server, log $(DEMO_DIR)/server.log)"; \
	$(BIN)/convserve --target localhost:$(DEMO_PORT) health --wait-s 180; \
	$(BIN)/convserve --target localhost:$(DEMO_PORT) models; \
	for model in mnist fashion digits8; do \
		if [ -f $(DEMO_DIR)/$$model.npz ]; then \
			echo; echo "== $$model"; \
			$(BIN)/convserve --target localhost:$(DEMO_PORT) predict --model $$model $(DEMO_DIR)/$$model.npz; \
		fi; \
	done; \
	echo; echo "== mnist over HTTP: TF Serving's REST API (curl)"; \
	if command -v curl > /dev/null 2>&1; then \
		label=$$($(PY) -c 'import json, numpy as np; \
			samples = np.load("$(DEMO_DIR)/mnist.npz"); \
			body = {"signature_name": "predict_uint8", "instances": samples["images"][:1].tolist()}; \
			open("$(DEMO_DIR)/rest-request.json", "w").write(json.dumps(body)); \
			print(samples["labels"][0])'); \
		curl -sS --fail-with-body -H 'Content-Type: application/json' \
			--data-binary @$(DEMO_DIR)/rest-request.json \
			localhost:$(DEMO_REST_PORT)/v1/models/mnist:predict; \
		echo; echo "(class probabilities of one held-out image labelled $$label)"; \
	else \
		echo "skipped: curl is not installed"; \
	fi; \
	kill -TERM $$server; wait $$server; trap - EXIT; \
	echo "server stopped cleanly"

test: setup
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy client/convserve server/convserve trainer/convserve proto/convserve/v1

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

generate: setup
	$(PY) proto/generate.py

# The README's pictures of the console's panels, taken by its browser test from a real
# run (needs Debian's chromium and chromium-driver).
screenshots: setup
	CONVSERVE_CONSOLE_SCREENSHOTS=server/docs $(BIN)/pytest tests/interop/test_console.py \
		-k screenshots -q

# Model throughput in-process, then served throughput through `convserve bench` with the
# server's CPU per request; then each protocol's cost on the same server.
BENCH_DIR ?= .bench
bench: setup
	@test -d $(BENCH_DIR)/mnist || $(BIN)/convserve-train --dataset sample --quiet \
		--model-base-path $(BENCH_DIR)/mnist
	$(PY) tests/bench.py --model-base-path $(BENCH_DIR)/mnist
	$(PY) tests/bench_protocols.py --model-base-path $(BENCH_DIR)/mnist

clean:
	rm -rf $(DEMO_DIR) $(BENCH_DIR) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
