# Two commands on a fresh machine: `make demo` (the main job on the embedded lab: a search, then its
# winner, the paper defaults and CoOp measured on the test split) and `make test`.
# Each creates .venv and installs the project into it when missing or when pyproject.toml changed.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
export HF_HUB_OFFLINE := 1

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(VENV)/bin/python -m gcs_tune.search --space search_spaces/demo.yaml --gpus 0
	$(VENV)/bin/python -m gcs_tune.best --export --seeds 1,2 --finalist-seeds 1

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/python pipelines/benchmarks/step_speed.py
	$(VENV)/bin/python pipelines/benchmarks/search_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
