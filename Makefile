# `make setup`: install into .venv (CPU build of torch, see constraints.txt) and run the default experiment.
# `make test`: install if needed (with the tracker extras its tests read back), then lint, run the test
# suite and check the built wheel.
VENV ?= .venv
PYTHON ?= python3

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[dev,tensorboard,mlflow,wandb]'
	touch $@

.PHONY: setup test
setup: $(VENV)/.installed
	$(VENV)/bin/ihstudy train

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -n auto  # one worker per core (pytest-xdist)
	PYTHON=$(VENV)/bin/python .ci/wheel-check
