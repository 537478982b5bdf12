# The two commands of the README: `make demo` and `make test`.
# Each creates (once) and reuses a local virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test misuse bench bench-instructions typecheck clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/quickstart.py

misuse: $(STAMP)
	$(PY) examples/misuse.py

typecheck: $(STAMP)
	$(PY) -m mypy

test: $(STAMP)
	$(PY) -m mypy
	$(PY) -m coverage erase
	$(PY) -m coverage run -m pytest $(PYTEST_ARGS)
	$(PY) -m coverage report $(if $(PYTEST_ARGS),,--fail-under=90)

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) benchmarks/overhead.py

# Needs valgrind (with its header valgrind/callgrind.h) and a C compiler; BENCH_ARGS e.g. "--json t.json".
bench-instructions: $(STAMP)
	$(PY) benchmarks/instructions.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .coverage .pytest_cache .mypy_cache *.egg-info
