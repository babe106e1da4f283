# make demo  : set up .venv, then run the pipeline on a synthetic cohort (see README)
# make test  : set up .venv, then run the test suite
# make bench : the benchmarks in bench/ (one figure each)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_CPU := torch==2.13.0
DEMO := demo

.PHONY: setup demo test bench clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	# A bare `torch` requirement would pull a multi-GB CUDA build; take the CPU wheel first when none is present.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q tests

demo: setup
	rm -rf $(DEMO)
	@echo "== 1. a synthetic SHHS cohort in NSRR's layout (30 nights, 15 subjects), prepared as night stores"
	$(PY) -m synthetic shhs $(DEMO)/nsrr/shhs --nights 30 --hours 2 --seed 1
	$(PY) -m prepare shhs $(DEMO)/nsrr/shhs $(DEMO)/nights --workers 2
	$(PY) -c "import pandas as pd; m = pd.read_csv('$(DEMO)/nights/manifest.csv'); print(m.groupby('split').size().to_string())"
	@echo "== 2. pretrain the tiny encoder (masked reconstruction) on the training split"
	$(PY) train_pretrain.py --config configs/pretrain_tiny.yaml --run-dir $(DEMO)/runs/pretrain --data.root $(DEMO)/nights
	@echo "== 3. train the sleep-stage probe on the frozen encoder's embeddings"
	$(PY) train_probe.py --config configs/probe_tiny.yaml --encoder $(DEMO)/runs/pretrain --run-dir $(DEMO)/runs/probe --data.root $(DEMO)/nights
	@echo "== 4. stage the held-out (test split) nights and score them"
	$(PY) evaluate.py --run $(DEMO)/runs/probe --out $(DEMO)/eval
	@echo "== 5. stage a user's EDF (a synthetic one here) with predict.py"
	$(PY) -m synthetic edf $(DEMO)/user --nights 1 --hours 2.5 --seed 99
	$(PY) predict.py $(DEMO)/user/night-001.edf --run $(DEMO)/runs/probe --out $(DEMO)/predict --edf-annotations
	@echo "== 6. does pretraining learn? a linear probe on the pretrained encoder and on an untrained one (0 steps)"
	$(PY) train_pretrain.py --config configs/pretrain_tiny.yaml --run-dir $(DEMO)/runs/untrained --data.root $(DEMO)/nights --train.max_steps 0
	for encoder in pretrain untrained; do \
	  $(PY) train_probe.py --config configs/probe_tiny.yaml --probe.kind linear --encoder $(DEMO)/runs/$$encoder --run-dir $(DEMO)/runs/linear-$$encoder --data.root $(DEMO)/nights && \
	  $(PY) evaluate.py --run $(DEMO)/runs/linear-$$encoder --out $(DEMO)/eval-linear-$$encoder --bootstrap 0 --png-nights 0 > /dev/null || exit 1; \
	done
	@$(PY) -c "import json; k = {e: json.load(open(f'$(DEMO)/eval-linear-{e}/results.json'))['pooled']['kappa'] for e in ('pretrain', 'untrained')}; print(f'linear probe kappa on the test nights: pretrained encoder {k[\"pretrain\"]:.3f}, untrained {k[\"untrained\"]:.3f} (gain {k[\"pretrain\"] - k[\"untrained\"]:+.3f})')"
	@echo "== done: results in $(DEMO)/eval (results.md, PNGs), the user's night in $(DEMO)/predict:"
	@ls $(DEMO)/predict

bench: setup
	$(PY) bench/prepare.py
	$(PY) bench/loader.py
	$(PY) bench/pretrain.py --config tiny --hours 1
	$(PY) bench/gemm.py
	$(PY) bench/predict.py
	$(PY) bench/vs_yasa.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
