# The two set-up commands of the README: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install clean

$(BIN)/td-ray: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/td-ray

demo: $(BIN)/td-ray
	$(BIN)/td-ray demo

test: $(BIN)/td-ray
	$(BIN)/python -m pytest

clean:
	rm -rf td-ray-workspace .pytest_cache
