# Two commands on a fresh machine with Python >= 3.10 and make:
#   make train   set up .venv, generate the built-in synthetic data, run the main job (short CPU training run)
#   make test    set up .venv, run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA := data/synthetic

.PHONY: train test test-fast lint clean

# Re-install only when pyproject.toml (or the install steps here) change.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	# The reference OpenFlamingo, a test-only oracle (tests/reference_oracle.py); it pins torch==2.0.1, hence --no-deps.
	$(BIN)/python -m pip install -q --no-deps open-flamingo==2.0.1 einops-exts==0.0.4
	touch $(STAMP)

# Regenerated (from scratch) only when the generator changes; a re-install alone keeps the data.
$(DATA)/.complete: flamingo_composer/cli/make_synthetic_data.py flamingo_composer/shards/synthetic.py flamingo_composer/vocab.py | $(STAMP)
	rm -rf $(DATA)
	$(BIN)/flamingo-make-synthetic-data --out $(DATA) --format both
	touch $@

train: $(STAMP) $(DATA)/.complete
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/composer train.py yamls/run.yaml

# Two pytest-xdist workers, one test module each at a time (module fixtures are built once), longest first
# (tests/conftest.py orders them; --no-loadscope-reorder keeps that order).
XDIST := -n 2 --dist loadfile --no-loadscope-reorder

# Lint first (seconds): a style error fails CI before the suite runs.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(XDIST)

# Everything but the multi-process and learning tests, for local iteration (CI runs `make test`).
test-fast: $(STAMP)
	$(BIN)/python -m pytest $(XDIST) -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile

clean:
	rm -rf $(VENV) $(DATA)
