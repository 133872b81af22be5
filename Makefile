# exitwise: the two commands are `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export EXITWISE_DATA_DIR ?= $(CURDIR)/.exitwise
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
# Material for MkDocs prints a banner about MkDocs 2.0 on every build; the docs build needs none of it.
export NO_MKDOCS_2_WARNING := 1

.PHONY: install system-deps postgres demo docs test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Debian packages the tests drive for real: headless Chromium and pdftoppm (poppler-utils).
system-deps:
	bash scripts/system-deps.sh

# Start the local PostgreSQL when it is installed but down; under CI, unreachable is fatal.
postgres:
	bash scripts/ensure-postgres.sh

demo: install
	bash scripts/demo.sh

# The documentation site, built strictly (any warning, broken link or anchor fails) into site/.
docs: install
	$(BIN)/python -m mkdocs build --strict

test: install system-deps postgres docs
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .exitwise .pytest_cache .hypothesis site
