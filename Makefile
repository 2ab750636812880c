# make test   : creates .venv if missing, installs the pinned dev dependencies, builds chip_ext
#               (CUDA kernels too when nvcc is found), installs Debian's chromium when missing (as root),
#               runs pytest and the C++ tests (ctest).
# make demo   : the same setup, then chip-ext demo --out demo_out (open demo_out/index.html)
# make build  : only the first three steps.      make bench : benchmarks/speed/bench_ops.py
# Idempotent: dependencies and the build are redone only when their inputs changed.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export PATH := $(abspath $(VENV))/bin:$(PATH)

# CUDA kernels: required (CHIP_EXT_CUDA=1) where nvcc is found, so a broken CUDA build fails loudly.
NVCC := $(shell command -v nvcc 2>/dev/null)
export CHIP_EXT_CUDA ?= $(if $(NVCC),1,auto)
# Toolkit root behind the nvcc wrapper (for CMake; setup.py finds it by itself).
CUDA_ROOT := $(if $(NVCC),$(shell f=$$(readlink -f $(NVCC)); if head -c2 $$f | grep -q '\#!'; then f=$$(grep -o '/[^ "]*/bin/nvcc' $$f | head -1); fi; dirname $$(dirname $$f)),)

SOURCES := $(shell find csrc python -name '*.cpp' -o -name '*.cu' -o -name '*.h' | grep -v build_config.h) \
           setup.py pyproject.toml

.PHONY: test build pytest ctest bench demo clean browser docs

$(VENV)/.deps: requirements-dev.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q pip==26.3
	$(PIP) install -q -r requirements-dev.txt
	@touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PIP) install --no-build-isolation --no-deps -e .
	@touch $@

build:
	@if ! ls chip_ext/_C*.so >/dev/null 2>&1 || [ ! -f chip_ext/_build_info.py ]; then rm -f $(VENV)/.built; fi
	@$(MAKE) --no-print-directory $(VENV)/.built
	$(PY) -m chip_ext info

# Headless Chromium for the demo page's browser test (Debian package; needs root). Best effort: without it the
# test skips, except under CI (CI=true), where it fails.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get install -y -qq chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)) ; } \
	  || echo "note: chromium not installed; the demo page's browser test will skip (apt-get install chromium)"

pytest: build browser
	$(PY) -m pytest

ctest: build
	cmake -S . -B build-cmake -G Ninja -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch;print(torch.utils.cmake_prefix_path)')" \
	      $(if $(CUDA_ROOT),-DCUDA_TOOLKIT_ROOT_DIR=$(CUDA_ROOT) -DCUDAToolkit_ROOT=$(CUDA_ROOT) -DCMAKE_CUDA_COMPILER=$(CUDA_ROOT)/bin/nvcc,)
	cmake --build build-cmake -j2
	ctest --test-dir build-cmake --output-on-failure

test: pytest ctest docs

# the documentation site (MkDocs + Material + mkdocstrings) into site/, warnings as errors
docs: build
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

bench: build
	$(PY) benchmarks/speed/bench_ops.py

demo: build
	$(PY) -m chip_ext demo --out demo_out

clean:
	rm -rf build build-cmake demo_out site chip_ext/_C*.so chip_ext/_build_info.py python/build_config.h $(VENV)/.built
