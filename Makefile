# trustrl: two commands on a fresh machine -- `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU wheel of torch 2.13.0 lies on this machine's disk; pin it first so the
# project's range (torch>=2.4,<3) is already satisfied and pip fetches nothing big.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup browser test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test,lora,wandb,trackio]"
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

demo: setup
	$(BIN)/trustrl demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) runs build *.egg-info
