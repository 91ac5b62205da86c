#!/usr/bin/env bash
# CI's asv step: keep the benchmark suite from rotting, in about a minute.
#   1. asv check: every benchmark imports and has valid params in this environment;
#   2. a quick run (one call each) of a tiny subset on a tiny shape, in this environment (--python=same), with the
#      results recorded against HEAD;
#   3. asv publish: the dashboard builds from them, with its CDN scripts fetched from npm and served locally
#      (tests/test_asv_dashboard.py renders such a dashboard in headless Chromium).
# Usage: bash .ci/asv_check.sh   (ASV_PYTHON=path/to/python, ASV_BENCH=regex to change the subset)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${ASV_PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
BENCH="${ASV_BENCH:-\('lstm', '(torch\.nn|native|torch|numba)'}"
start=$SECONDS

# a machine name of its own: one-call smoke numbers must not mix with `make asv`'s real ones on the dashboard
MACHINE="${ASV_MACHINE:-ci-quick}"
"$PY" -m asv machine --yes --machine "$MACHINE" >/dev/null  # asv asks interactively otherwise
"$PY" -m asv check --python=same
SEQFAST_ASV_GRID=tiny "$PY" -m asv run --python=same --quick --show-stderr --machine "$MACHINE" \
    --set-commit-hash "$(git rev-parse HEAD)" --bench "$BENCH"
"$PY" -m asv publish
"$PY" .ci/asv_offline_dashboard.py .asv/html  # asv's page loads its scripts from CDNs; serve them locally
echo "asv check + quick run + publish: $((SECONDS - start)) s; dashboard in .asv/html"
