# trustrl: two commands on a fresh machine -- `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU wheel of torch 2.13.0 lies on this machine's disk; pin it first so the
# project's range (torch>=2.4,<3) is already satisfied and pip fetches nothing big.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup browser test test-floor demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test,lora,wandb,trackio,label]"
	touch $(STAMP)

# Headless Chromium for the browser tests (Debian's chromium + chromium-driver; selenium drives
# them and downloads nothing): installed when missing and apt-get is there (root, or sudo -n).
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	    $$SUDO apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else \
	    echo "make browser: no apt-get; install Chromium and chromedriver, or the browser tests are skipped"; \
	  fi; \
	fi

test: setup browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The oldest transformers that pyproject.toml allows ("transformers>=X"), tested as well: a
# second venv with exactly X (read from pyproject.toml, so the two cannot drift apart) runs the
# tests that go through transformers' API -- model loading and saving, tokenizers and chat
# templates, generate, log-probs of every listed architecture, each LLM trainer, checkpoints.
FLOOR_VENV := .venv-floor
TRANSFORMERS_FLOOR := $(shell sed -n 's/^ *"transformers>=\([0-9][0-9.]*\)".*/\1/p' pyproject.toml)
FLOOR_TESTS ?= tests/test_architectures.py tests/test_logprobs.py tests/test_rollout.py tests/test_data.py \
	tests/test_sft.py tests/test_reward_model.py tests/test_grpo.py tests/test_ppo.py tests/test_trpo_lm.py \
	tests/test_checkpoint.py tests/test_resume.py tests/test_lora_save.py tests/test_rm_text.py

test-floor:
	@test -n "$(TRANSFORMERS_FLOOR)" || { echo "test-floor: no \"transformers>=X\" line in pyproject.toml"; exit 1; }
	test -x $(FLOOR_VENV)/bin/python || $(PY) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -c "import torch" 2>/dev/null || $(FLOOR_VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(FLOOR_VENV)/bin/pip install -q -e ".[test,lora]" "transformers==$(TRANSFORMERS_FLOOR)"
	$(FLOOR_VENV)/bin/python -c "import transformers as t; from packaging.version import Version as V; \
	  assert V(t.__version__) == V('$(TRANSFORMERS_FLOOR)'), t.__version__"
	$(FLOOR_VENV)/bin/python -m pytest $(PYTEST_ARGS) $(FLOOR_TESTS)

demo: setup
	$(BIN)/trustrl demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) $(FLOOR_VENV) runs build *.egg-info
