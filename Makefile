# The two commands: `make demo` and `make test`. Both start with `make setup`.
PY := .venv/bin/python

.PHONY: setup test demo bench clean
setup:
	./scripts/setup.sh

test: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) -m splicectl demo

bench: setup
	$(PY) bench/run.py

clean:
	rm -rf .venv *.egg-info loader/*.egg-info
