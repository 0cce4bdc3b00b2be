# make demo: set up .venv, generate the synthetic world, pre-train a tiny ALBEF on CPU, print zero-shot R@K
# make test: set up .venv, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= data/synthetic
OUT ?= output/demo
PYTEST_ARGS ?=
# the demo's last epoch (configs/Pretrain_tiny.yaml: 6 epochs)
DEMO_CKPT ?= $(OUT)/checkpoint_05.pth

export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

.PHONY: install demo retrieval-demo tasks-demo grounding-demo ablation test bench clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m dataset.synthetic --out $(DATA)
	$(PY) Pretrain.py --config configs/Pretrain_tiny.yaml --output_dir $(OUT) --device cpu --overwrite

# after `make demo`: zero-shot evaluation with ITM re-rank, then retrieval fine-tuning, of the demo model
retrieval-demo: install
	$(PY) Retrieval.py --config configs/Retrieval_tiny.yaml --output_dir $(OUT)_retrieval_zeroshot \
		--checkpoint $(DEMO_CKPT) --device cpu --evaluate
	$(PY) Retrieval.py --config configs/Retrieval_tiny.yaml --output_dir $(OUT)_retrieval \
		--checkpoint $(DEMO_CKPT) --device cpu --overwrite

# after `make demo`: SNLI-VE, NLVR2 (text assignment, then fine-tuning) and VQA on the synthetic world's tasks
tasks-demo: install
	$(PY) -m dataset.synthetic_tasks --world $(DATA)
	$(PY) VE.py --config configs/VE_tiny.yaml --output_dir $(OUT)_ve --checkpoint $(DEMO_CKPT) \
		--device cpu --overwrite
	$(PY) Pretrain_nlvr.py --config configs/NLVR_pretrain_tiny.yaml --output_dir $(OUT)_nlvr_ta \
		--checkpoint $(DEMO_CKPT) --device cpu --overwrite
	$(PY) NLVR.py --config configs/NLVR_tiny.yaml --output_dir $(OUT)_nlvr --checkpoint $(OUT)_nlvr_ta/checkpoint_00.pth \
		--device cpu --overwrite
	$(PY) VQA.py --config configs/VQA_tiny.yaml --output_dir $(OUT)_vqa --checkpoint $(DEMO_CKPT) \
		--device cpu --overwrite

# after `make demo`: weakly-supervised grounding on the synthetic world (fine-tune with ITM Grad-CAM evaluation,
# then the fine-tuned model evaluated with ITC Grad-CAM); accuracies printed next to chance
grounding-demo: install
	$(PY) -m dataset.synthetic_grounding --world $(DATA)
	$(PY) Grounding.py --config configs/Grounding_tiny.yaml --output_dir $(OUT)_grounding \
		--checkpoint $(DEMO_CKPT) --device cpu --overwrite
	$(PY) Grounding.py --config configs/Grounding_tiny.yaml --output_dir $(OUT)_grounding_itc \
		--checkpoint $(OUT)_grounding/checkpoint_best.pth --device cpu --evaluate --gradcam_mode itc --overwrite

# the paper's Table 1 in miniature: each objective row pre-trained at the demo size on 3 seeds (hours on 2 cores;
# resumable: finished runs are skipped); writes output/ablation/ablation.{md,json,png}
ablation: install
	$(PY) -m dataset.synthetic --out $(DATA)
	$(PY) -m tools.ablation --config configs/Pretrain_tiny_ablation.yaml --seeds 0 1 2 --out output/ablation

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) bench/bench_pretrain.py

clean:
	rm -rf $(OUT) $(DATA)
