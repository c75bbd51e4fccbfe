# The README's two commands: `make demo` and `make test`. Both set everything up themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.adamkit-installed

.PHONY: install demo test results clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned here (the package itself accepts torch>=2.4): 2.13.0 is a local CPU build,
# any other request downloads gigabytes.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/adamkit bench --suite quick --out runs/demo

# docs/RESULTS.md and its figures: every claim measured (about 30 minutes on 2 cores; reruns reuse runs)
results: $(STAMP)
	$(VENV)/bin/adamkit results --out docs --jobs 2

# -n auto: one test process per core; they share the on-disk kernel cache
test: $(STAMP)
	$(PY) -m pytest -n auto

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
