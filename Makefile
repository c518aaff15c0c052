# make demo: install (CPU torch first), fetch the real models, run the README demo (projection, then refine).
# make demo-fast: the same demo without the refine runs (the projection only).
# make test: install, then the whole test suite, real-model tests included (scripts/test.sh).
PYTHON ?= python

.PHONY: install demo demo-fast test bench

install:
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e '.[test]'

demo: install
	$(PYTHON) scripts/demo.py

demo-fast: install
	$(PYTHON) scripts/demo.py --no_refine

test: install
	bash scripts/test.sh

bench:
	$(PYTHON) scripts/bench_quality.py
