# asv targets, included by the top-level Makefile (`include benchmarks/Makefile.asv.mk`).
#   make asv          benchmark the last $(ASV_COMMITS) commits (each built in its own virtualenv with the pinned
#                     CPU torch, results kept in .asv/results; benchmarks with results are not rerun), then publish .asv/html
#   make asv-preview  serve the dashboard at http://127.0.0.1:8080
#   make asv-ci       what CI runs: asv check + a tiny quick run in this environment + publish (.ci/asv_check.sh)
# SEQFAST_ASV_GRID=full make asv   benchmarks the full shape grid.

# the top-level Makefile's venv ($(BIN), installed by $(STAMP)) when included there
ASV_PYTHON ?= $(if $(BIN),$(BIN)/python,$(if $(wildcard .venv/bin/python),.venv/bin/python,python3))
ASV ?= $(ASV_PYTHON) -m asv
ASV_COMMITS ?= 4
ASV_ARGS ?=

.PHONY: asv asv-preview asv-ci

asv: $(STAMP)
	$(ASV) machine --yes > /dev/null
	mkdir -p .asv
	git rev-list --max-count=$(ASV_COMMITS) HEAD > .asv/commits.txt
	@# publish even when a benchmark failed (the dashboard shows which), then report the failure
	status=0; $(ASV) run --skip-existing --show-stderr $(ASV_ARGS) HASHFILE:.asv/commits.txt || status=$$?; \
	$(ASV) publish && $(ASV_PYTHON) .ci/asv_offline_dashboard.py .asv/html && \
	echo "dashboard: make asv-preview, or $(ASV_PYTHON) -m http.server -d .asv/html -b 127.0.0.1 8080" && \
	exit $$status

asv-preview:
	$(ASV) preview --port 8080

asv-ci: $(STAMP)
	ASV_PYTHON=$(ASV_PYTHON) bash .ci/asv_check.sh
