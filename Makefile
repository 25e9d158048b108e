# Thin wrappers; the scripts do the work (and run on machines without make).
.PHONY: setup up down purge status demo test bench bench-ci bench-baseline bench-ci-baseline
setup:
	bash scripts/setup.sh
up:
	.venv/bin/python -m devstack up --dagster
down:
	.venv/bin/python -m devstack down
purge:
	.venv/bin/python -m devstack down --purge
status:
	.venv/bin/python -m devstack status
demo:
	bash scripts/demo.sh
test:
	bash scripts/test.sh
# full benchmarks (10M features, ~15 min), the small CI set, and the deliberate baseline updates
bench:
	bash scripts/bench.sh
bench-ci:
	bash scripts/bench.sh --ci
bench-baseline:
	bash scripts/bench.sh --update-baseline
bench-ci-baseline:
	bash scripts/bench.sh --ci --update-baseline
