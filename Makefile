# The two commands: `make demo` and `make test`. Both start with `make setup`.
PY := .venv/bin/python

.PHONY: setup test soak demo bench clean
setup:
	./scripts/setup.sh

# Every contract test on both backends as root, then the worker backend's
# again as an unprivileged user (nobody).
test: setup
	$(PY) -m pytest -q -m "not soak"
	./scripts/test-unprivileged.sh

soak: setup
	$(PY) -m pytest -q -s -m soak

demo: setup
	$(PY) -m splicectl demo

bench: setup
	$(PY) bench/run.py

clean:
	rm -rf .venv *.egg-info loader/*.egg-info
