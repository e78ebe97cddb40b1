# Two set-up commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on local disk; pinning it keeps pip from pulling a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: install test test-slow demo demo-align ablations bench clean

$(BIN)/dina-lrm: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH_PIN)" -e ".[all,dev]"
	touch $@

install: $(BIN)/dina-lrm

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-slow: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/dina-lrm demo --out demo_out

demo-align: install
	HF_HUB_OFFLINE=1 $(BIN)/dina-lrm toyworld align --out demo_out/alignment

ablations: install
	HF_HUB_OFFLINE=1 $(BIN)/dina-lrm toyworld ablations --out demo_out/ablations

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python bench/score_throughput.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/train_throughput.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/serve_load.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
