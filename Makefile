# The two commands of the README, spelled out. Python >= 3.11 is the only prerequisite.
PYTHON ?= python3
VENV ?= .venv

.PHONY: serve test lint bench

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip

serve: $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -q -e .
	$(VENV)/bin/batchd serve

test: $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile

lint: $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -q -e '.[test,dev]'
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy src

bench: $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	$(VENV)/bin/python bench/throughput.py
