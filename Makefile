# The two commands of the README: `make demo` and `make test`.
# Each creates (once) and reuses a local virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test misuse bench bench-instructions typecheck dist matrix matrix-corners docs clean

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

# An sdist and a wheel in dist/, checked as PyPI would check them.
dist: $(STAMP)
	rm -rf dist
	$(PY) -m build --outdir dist .
	$(PY) -m twine check --strict dist/*

# The version matrix of noxfile.py (Python 3.10-3.13 x SQLAlchemy 2.0/2.1); NOX_ARGS narrows it,
# e.g. NOX_ARGS='-s py313-sa21'. matrix-corners runs CI's two representative cells.
matrix: $(STAMP)
	$(PY) -m nox $(NOX_ARGS)

matrix-corners: $(STAMP)
	$(PY) -m nox -t corners $(NOX_ARGS)

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) benchmarks/overhead.py

# Needs valgrind (with its header valgrind/callgrind.h) and a C compiler; BENCH_ARGS e.g. "--json t.json".
bench-instructions: $(STAMP)
	$(PY) benchmarks/instructions.py $(BENCH_ARGS)

docs: $(STAMP)  # the site in site/ (open site/index.html); warnings are errors
	$(PY) -m pip install --quiet -e '.[test,docs]'
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) .nox build dist .coverage .pytest_cache .mypy_cache *.egg-info site
