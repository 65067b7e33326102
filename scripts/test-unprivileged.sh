#!/bin/sh
# The contract tests on the worker backend as an unprivileged user (nobody):
# no capabilities, nothing written into the checkout. Run by `make test`
# after the main run; extra arguments go to pytest.
set -eu
cd "$(dirname "$0")/.."
run_dir=$(mktemp -d /tmp/sosplice-unpriv.XXXXXX)
chmod 777 "$run_dir"
trap 'rm -rf "$run_dir"' EXIT
setpriv --reuid="$(id -u nobody)" --regid="$(id -g nobody)" --clear-groups --inh-caps=-all \
    env HOME="$run_dir" PYTHONDONTWRITEBYTECODE=1 SOSPLICE_RUN_DIR="$run_dir/run" \
    .venv/bin/python -m pytest -q -p no:cacheprovider --backend worker -m "not soak" \
    --ignore tests/test_internals.py --ignore tests/test_splicectl.py "$@"
