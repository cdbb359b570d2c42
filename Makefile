# Two entry points do all set-up themselves on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch lies on this machine's disk; install it before anything can pull a CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/autoprune demo

test: $(STAMP)
	$(VENV)/bin/ruff check autoprune tests benchmarks
	$(PY) -m pytest

# The inner loop: everything but the tests marked slow (end-to-end runs, Ray, subprocesses).
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check autoprune tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
