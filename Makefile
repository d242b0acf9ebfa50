# visionsweep — `make train` and `make test` set themselves up on first use (.venv/ in the repo).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RAY_STAMP := $(VENV)/.installed-ray
ARGS ?=
# `make test` workers (pytest-xdist): one per core this process may use, at most 4 (each imports torch and builds
# its own fixtures); 0 runs the tests in make's own process (for --pdb, -x). nproc would count OMP_NUM_THREADS
# (threads per process), which the workers honour instead.
TEST_WORKERS ?= $(shell n=$$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))
GPU_PYTHON ?= 3.12
GPU_WHEELS ?= .whl
GPU_CHECK_OUT ?= runs/gpu-check
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE ?= offline

.PHONY: help install install-ray train eval calibrate predict export pretrain sweep report see bench bench-fastai cache test test-scaling test-all gpu-wheels gpu-check clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@echo "setting up $(VENV) (once; ~3-4 min: torch, lightning, timm, hydra + launchers, albumentations, wandb, mlflow)"
	$(PYTHON) -m venv $(VENV)
	set -o pipefail; $(PY) -m pip install --quiet -e '.[dev,dashboards]' 2>&1 | { grep -v "is ignored: it is neither" || true; }
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package with its dependencies (and the dashboards extra)

# the ray extra pins cloudpickle<3 and so joblib<1.6 (hydra-ray-launcher's last release): only those who use it pay
$(RAY_STAMP): $(STAMP)
	set -o pipefail; $(PY) -m pip install --quiet -e '.[ray]' 2>&1 | { grep -v "is ignored: it is neither" || true; }
	touch $(RAY_STAMP)

install-ray: $(RAY_STAMP)  ## add the ray extra (hydra/launcher=ray; +32 packages, ~300 MB, joblib 1.5 instead of 1.6)

train: $(STAMP)  ## train the default config (resnet34 on the embedded digits); ARGS="model=vgg19 ..."
	$(PY) -m visionsweep.train $(ARGS)

eval: $(STAMP)  ## evaluate a checkpoint: make eval ARGS="ckpt_path=runs/train/<run>/checkpoints/last.ckpt"
	$(PY) -m visionsweep.eval $(ARGS)

calibrate: $(STAMP)  ## temperature scaling of a checkpoint (a calibrated copy): make calibrate ARGS="ckpt_path=..."
	$(PY) -m visionsweep.calibrate $(ARGS)

predict: $(STAMP)  ## class + probabilities per image: make predict ARGS="ckpt_path=... input=<image|folder>"
	$(PY) -m visionsweep.predict $(ARGS)

export: $(STAMP)  ## ONNX / TorchScript export: make export ARGS="ckpt_path=... format=onnx"
	$(PY) -m visionsweep.export $(ARGS)

pretrain: $(STAMP)  ## our own "pretrained" resnet34 (digits 0-6) for the offline fine-tune demo → data/pretrained/resnet34_digits0-6.safetensors (experiment=three_people also makes it on first use)
	$(PY) -m visionsweep.models.builtin_weights data/pretrained/resnet34_digits0-6.safetensors

sweep: $(STAMP)  ## the smoke sweep (arch x augmentation x seed, 18 tiny jobs); the full one: python -m visionsweep.train -m experiment=arch_vs_aug
	$(PY) -m visionsweep.train -m experiment=smoke_sweep $(ARGS)

report: $(STAMP)  ## comparison report of the newest sweep (or ARGS="runs/train/multirun/<stamp>")
	$(PY) -m visionsweep.report $(ARGS)

see: $(STAMP)  ## pictures of what a CNN sees: make see ARGS="see=kernels" (kernels, augment, batch, features, occlusion, gradcam, errors)
	$(PY) -m visionsweep.see $(ARGS)

bench: $(STAMP)  ## speed ratios measured side by side (framework vs hand-written loop, loaders, cache, sweep sequential vs joblib)
	$(PY) benchmarks/bench.py $(ARGS)

.venv-fastai/.installed:
	@echo "setting up .venv-fastai (once; fastai 2.8 in its own venv, for make bench-fastai only)"
	$(PYTHON) -m venv .venv-fastai
	set -o pipefail; .venv-fastai/bin/python -m pip install --quiet 'fastai>=2.8,<2.9' 2>&1 | { grep -v "is ignored: it is neither" || true; }
	touch $@

bench-fastai: $(STAMP) .venv-fastai/.installed  ## the default job vs fastai's vision_learner + fit_one_cycle, side by side on the same core, 3 seeds (~10 min)
	$(PY) benchmarks/vs_fastai.py $(ARGS)

cache: $(STAMP)  ## pre-fill the decoded-sample cache: make cache ARGS="data=folder data.root=/photos model=resnet34"
	$(PY) -m visionsweep.cache $(ARGS)

test: $(STAMP)  ## run the test suite (fast tests, a few minutes on 2 cores; a worker per core, TEST_WORKERS=0: none)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(ARGS)

test-scaling: $(RAY_STAMP)  ## end to end (minutes): launcher (joblib, submitit, ray), resume and DDP sweeps, kill/resume, dashboard servers, the wheel
	$(PY) -m pytest -m "scaling or package" $(ARGS)

test-all: $(RAY_STAMP)  ## run every test, slow ones included
	$(PY) -m pytest -m "" $(ARGS)

gpu-wheels: $(STAMP)  ## where the package index is reachable: the wheels a bare PyTorch GPU image lacks → .whl/ (GPU_PYTHON=3.12)
	$(PY) tools/gpu_wheels.py --python-version $(GPU_PYTHON) --dest $(GPU_WHEELS)

gpu-check:  ## on the GPU machine, no network: install .whl/ into a temporary prefix, pytest -m gpu + GPU bench lines → runs/gpu-check/gpu-check.json (PYTHON=<python with torch>)
	$(PYTHON) tools/gpu_check.py --wheels $(GPU_WHEELS) --out $(GPU_CHECK_OUT) $(ARGS)

clean:  ## remove caches (keeps .venv, data/ and runs/)
	rm -rf .pytest_cache src/*.egg-info
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +
