# The README's commands. Every target sets itself up: a fresh machine needs only Python 3.11.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Tests never touch the network (data comes from ../shared/data or from local hub-layout fixtures). The demos
# read the offline mirror when there is one and otherwise download the public hub copies (ofa_lib.data).
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PIP_DISABLE_PIP_VERSION_CHECK := 1
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
# pip.conf on these machines names index folders that may not exist: hide that noise only
QUIET := 2>&1 | { grep -v 'is ignored' || true; }

.PHONY: gpu-check install lint notebooks test test-reliability demo demo-diagnosis demo-sam demo-unfreezing study-ner reproduce-paper bench clean-outputs

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip $(QUIET)
	# torch first and exactly pinned: the CPU wheel, never a CUDA download
	$(BIN)/python -m pip install -q torch==2.13.0 $(QUIET)
	$(BIN)/python -m pip install -q -e ".[dev]" $(QUIET)
	$(BIN)/python -c "import torch, transformers, ofa_lib; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

# after editing a notebook's source (notebooks/NN_*.py) outside JupyterLab: rewrite its .ipynb half (and the
# other way round: jupytext updates whichever half is older); tests/test_notebook_pairs.py checks they agree
notebooks: install
	$(BIN)/jupytext --sync notebooks/[0-9][0-9]_*.py

# ruff over the package, tests, benchmarks and the notebooks' sources (rules in pyproject.toml)
lint: install
	$(BIN)/ruff check ofa_lib tests benchmarks notebooks

# the suite without its reliability tier (the tests marked `reliability`: real processes killed, stopped and
# signalled, the real one-node SLURM); CI runs both
test: lint
	$(OFFLINE) $(BIN)/python -m pytest -q --durations=15 -m "not reliability" tests

test-reliability: install
	$(OFFLINE) $(BIN)/python -m pytest -q --durations=15 -m reliability tests

demo: install
	$(BIN)/python -m ofa_lib.grid run params/grids/demo.yaml --backend local

# the extensions' demo grids (each within 20 min on a quiet 2-core CPU): 05_measures.html, 06 report.html
# why the demo's averaged CA weights trail (issue 18): interpolations, distances from θ₀, the r = 1 check, CA
# without its earliest snapshots, fp32 vs the storage dtype; then the demo report again, now showing it
demo-diagnosis: install
	$(OFFLINE) $(BIN)/python -m ofa_lib.analysis.diagnose outputs/runs/demo/sib-* --out outputs/reports/demo/diagnosis
	$(BIN)/python -m ofa_lib.grid report params/grids/demo.yaml

demo-sam: install
	$(BIN)/python -m ofa_lib.grid run params/grids/demo_sam.yaml --backend local

demo-unfreezing: install
	$(BIN)/python -m ofa_lib.grid run params/grids/demo_unfreezing.yaml --backend local

# the paper's NER protocol at CPU scale (21 runs, then 03 over 3 samplings and 04; budget 2.5 h on a quiet 2-core
# CPU, measured in the README; `grid plan --estimate` says less: it under-estimated these runs 1.6×). Resumable:
# run it again after a stop. Its learning-rate sweep: params/grids/cpu_ner_sweep.yaml
study-ner: install
	$(BIN)/python -m ofa_lib.grid plan params/grids/cpu_ner.yaml --estimate
	$(BIN)/python -m ofa_lib.grid run params/grids/cpu_ner.yaml --backend local

reproduce-paper: install
	mkdir -p outputs/reports/paper
	$(OFFLINE) $(BIN)/papermill --no-progress-bar notebooks/04_analysis.ipynb \
		outputs/reports/paper/.04_analysis.tmp.ipynb -f params/reproduce_paper.yaml --cwd notebooks
	mv outputs/reports/paper/.04_analysis.tmp.ipynb outputs/reports/paper/04_analysis.ipynb
	$(BIN)/python -m ofa_lib.analysis.report render outputs/reports/paper/04_analysis.ipynb

# ~15 min on a quiet 2-core machine; each script writes benchmarks/raw/<name>.json (stale CPU results are
# removed first; GPU JSONs from `--device cuda` runs are kept), then make_results.py writes RESULTS.md.
# A failing script is reported and the others still run; make exits non-zero at the end.
BENCHES := averaging merging accumulative storage bytes training group_by_length eval e2e
bench: install
	rm -f $(addprefix benchmarks/raw/,averaging.json merging.json accumulative.json storage.json bytes.json eval_cache.json \
		training.json group_by_length.json evaluation.json e2e.json)
	status=0; for b in $(BENCHES); do \
		echo "== benchmarks/bench_$$b.py"; start=$$(date +%s); \
		$(OFFLINE) TOKENIZERS_PARALLELISM=false $(BIN)/python benchmarks/bench_$$b.py || { status=1; echo "!! bench_$$b.py failed"; }; \
		echo "== bench_$$b.py: $$(( $$(date +%s) - start )) s"; \
	done; \
	$(BIN)/python benchmarks/make_results.py; exit $$status

clean-outputs:
	rm -rf outputs/runs outputs/results outputs/reports outputs/data

# On a GPU machine only (never in CI): sets itself up (CUDA torch for this GPU), ≤ 8 min, writes
# benchmarks/raw/gpu_*.json, training_cuda_*.json, cost_cuda.json and RESULTS.md
gpu-check:
	bash benchmarks/gpu_check.sh
