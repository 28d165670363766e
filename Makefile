# make test  - create .venv if needed, install, run the test suite
# make demo  - train on the generated demo dataset (CPU, minutes) and segment its val images
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_RUN := run/demo/make-demo

.PHONY: test demo install clean-demo

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt requirements-deploy.txt requirements-plot.txt \
		constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt \
		-r requirements-deploy.txt -r requirements-plot.txt -c constraints.txt
	touch $(STAMP)

# Two pytest workers (pytest-xdist), each file's tests on one worker (its module fixtures built
# once), one thread per process: most of the suite is Python and process start-up, which one
# thread per worker keeps both cores busy with; two threads per worker would oversubscribe them.
TEST_WORKERS ?= 2

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

demo: $(STAMP)
	rm -rf $(DEMO_RUN) inference_results/demo
	$(PY) train.py --dataset demo --backbone resnet18 --no-pretrained --out-stride 16 \
		--epochs 30 --batch-size 8 --lr 0.02 --crop-size 96 --base-size 96 --workers 1 \
		--amp off --eval-interval 10 --run-dir $(DEMO_RUN)
	$(PY) inference.py --ckpt $(DEMO_RUN)/model_best.pth.tar \
		--in-path data/demo/val2017 --out-path inference_results/demo

clean-demo:
	rm -rf run/demo data/demo inference_results/demo
