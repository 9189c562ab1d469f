# The two set-up commands of the README: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install browser clean

$(BIN)/td-ray: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/td-ray

demo: $(BIN)/td-ray
	$(BIN)/td-ray demo

# The report's test opens it in Debian's chromium through chromedriver: installed here when missing (as root, or
# with sudo); without them that one test is skipped and says why.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; else SUDO=none; fi; \
	  if [ "$$SUDO" = none ]; then echo "chromium/chromedriver missing and no root: the browser test will skip"; \
	  else $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; fi; \
	fi

test: $(BIN)/td-ray browser
	$(BIN)/python -m pytest

clean:
	rm -rf td-ray-workspace .pytest_cache
