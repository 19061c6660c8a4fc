# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test venv clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,gui,vendor,nion,batch]'
	@touch $(STAMP)

venv: $(STAMP)

# simulator + engine (gp model, rVAE trained from scratch) + monitor when there is a display;
# ARGS="--frames 60 --preset srtio3" (or "--model rigid", "--no-rvae") to change it
demo: $(STAMP)
	$(VENV)/bin/stem-live demo $(ARGS)

# the house rules first (ruff, import contracts in pyproject.toml), then the tests
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .ruff_cache .import_linter_cache
