# Entry points for a fresh machine: `make demo` (the main job), `make test` (the commit tier), `make test-all`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-all demo demo-data toy2d-bench toy2d-dx-bench digits-nfe-bench teacher clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# `make test`: the tier to run before every commit (<= 10 min on a quiet 2-core machine): unit, integration and
# one end-to-end run of each kind. `make test-all`: every tier (soaks, real SLURM, rehearsals), what CI runs.
# docs/testing.md says what is in which tier and why.
FAST := not slow and not soak and not slurm and not gpu

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -ra -m "$(FAST)" $(PYTEST_ARGS)

test-all: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -ra --durations=25 $(PYTEST_ARGS)

# `make demo`: the data-free student (<= 10 min on a quiet 2-core machine, docs/demo.md); `make demo-data` then
# trains the data-based student too and shows both beside the teacher.
demo: $(STAMP)
	$(BIN)/piflow demo

demo-data: $(STAMP)
	$(BIN)/piflow demo --students data-based

toy2d-bench: $(STAMP)
	$(BIN)/python benchmarks/toy2d.py

toy2d-dx-bench: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/toy2d_dx.py --iters 0 --settings grid:0:0,grid:3:0,polynomial:0:0,polynomial:3:0,gm:0:0
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/toy2d_dx.py --settings grid:0:1e-3,grid:3:1e-3 --iters 250
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/toy2d_dx.py --settings grid:3:1e-3,polynomial:3:1e-3 --train-seeds 0,1,2 --iters 1000 \
		--merge-toy2d benchmarks/results/toy2d.json

digits-nfe-bench: $(STAMP)
	$(BIN)/python benchmarks/digits_nfe.py

clean:
	rm -rf $(VENV) runs .pytest_cache
