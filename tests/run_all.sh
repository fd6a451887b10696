#!/usr/bin/env bash
# The project's whole test suite: repository checks + pytest over tests/ + nbdev_test over nbs/.
# README's test command and .ci/run both call this script.
set -euo pipefail
cd "$(dirname "$0")/.."
export MPLBACKEND=Agg HF_HUB_OFFLINE=1 PYTHONHASHSEED=0 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
echo "== ruff (pyproject.toml: syntax errors, pyflakes and line length over avar_net/ and tests/)"
ruff check
echo "== nbdev_test over nbs/ (IN_TEST=1: every module notebook runs its ci-sized path)"
# The experiment notebooks (2x_*) are executed once, by tests/test_reproduce_ci.py (papermill, profile ci), not twice.
# One torch thread per notebook worker: two workers x two threads on two cores makes every parallel op wait.
(cd nbs && OMP_NUM_THREADS=1 nbdev_test --n_workers 2 --timing --skip_file_re '^([_.]|2[0-9]_)')
echo "== pytest over tests/ ($(( $(date +%s) - start )) s so far)"
python -m pytest tests -p no:cacheprovider --timeout 1200 -q -rs --durations=15
echo "== all tests passed in $(( $(date +%s) - start )) s"
