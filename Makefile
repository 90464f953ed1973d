.PHONY: demo test bench lint clean

## Run the demo: a local node (Docker engine, runtime image) running the seed's dice function.
demo:
	bash scripts/demo.sh

## Run the whole test suite (lint, types, unit, integration on the real Docker engine and Redis).
test:
	bash scripts/test.sh

## Run the benchmarks (prints figures and ratios to the machine's floors). `make bench ARGS=--quick`: a short run.
bench:
	bash scripts/bench.sh $(ARGS)

lint:
	.venv/bin/ruff check . && .venv/bin/mypy

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache
