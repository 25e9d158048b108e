# Thin wrappers; the scripts do the work (and run on machines without make).
.PHONY: setup up down status demo test bench
setup:
	bash scripts/setup.sh
up:
	.venv/bin/python scripts/stack.py up --dagster
down:
	.venv/bin/python scripts/stack.py down
status:
	.venv/bin/python scripts/stack.py status
demo:
	bash scripts/demo.sh
test:
	bash scripts/test.sh
bench:
	.venv/bin/python scripts/stack.py up && .venv/bin/pytest benchmarks --benchmark-json=.state/benchmarks.json
