# make demo / make test: both create .venv with the pinned stack on first use.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# NeMo's SFT dataset builds a C++ helper by running `python3 -m pybind11`: the venv must come first on PATH.
export PATH := $(abspath $(VENV))/bin:$(PATH)
# On 2 cores, one OpenMP thread per process is steadier and faster (NEMO_CPU.md).
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast clean

install: $(VENV)/.installed

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

test: install
	$(VPY) -m pytest -q -ra

test-fast: install  # tests/pure only: seconds, no NeMo
	$(VPY) -m pytest -q -ra -m pure

clean:
	rm -rf runs/demo
