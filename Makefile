# make test       create .venv if missing, install the dev set, build the extension, lint
#                 (ruff), run every test (slow ones included), then one smoke call of each
#                 kernel benchmark
# make test-fast  the same set-up and lint, then the tests not marked `slow` (pytest -m "not
#                 slow"): every op and every model family still run once, without the
#                 extension rebuild, the Triton interpreter sweeps, inductor compiles and
#                 whole-model exports that make up most of `make test`'s time
# make bench      same set-up, then the model benchmark (python -m resnet_fast.bench), with the
#                 peers (ONNX Runtime, OpenVINO) where they installed
# make bench-kernels  the kernel benchmarks (pytest-benchmark; JSON in .benchmarks/)
# make build      set-up and build only
#
# The extension rebuilds only when csrc/, setup.py or pyproject.toml change.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := .make
# The nvcc on PATH on our dev machines is a wrapper; the real toolkit is /usr/local/cuda.
CUDA_HOME ?= $(wildcard /usr/local/cuda)
export CUDA_HOME
# Where a toolkit is present, the CUDA kernels must compile: a test asserts it.
REQUIRE_CUDA := $(if $(and $(CUDA_HOME),$(wildcard $(CUDA_HOME)/bin/nvcc)),$(if $(filter 1,$(RESNET_FAST_NO_CUDA)),0,1),0)
SOURCES := $(shell find csrc -type f) setup.py pyproject.toml

.PHONY: test test-fast bench bench-kernels build clean

$(STAMPS)/deps: requirements-dev.txt requirements-peers.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@$(PY) -m pip install --quiet --disable-pip-version-check --retries 0 --timeout 30 \
		-r requirements-peers.txt \
	|| echo "NOTE: the benchmark peers in requirements-peers.txt did not install (no package index?); resnet-fast bench will list them as not run"
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/build: $(STAMPS)/deps $(SOURCES)
	@echo "building resnet_fast._C (CUDA_HOME=$(CUDA_HOME))"
	@start=$$(date +%s); \
	$(PY) -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e . \
	&& echo "extension built in $$(( $$(date +%s) - start )) s"
	@touch $@

build: $(STAMPS)/build

test: build
	$(PY) -m ruff check .
	RESNET_FAST_REQUIRE_CUDA_BUILD=$(REQUIRE_CUDA) $(PY) -m pytest
	@echo "kernel suites, smoke run (one cold call each: not a measurement; so they cannot rot):"
	RESNET_FAST_BENCH_BATCHES=1 $(PY) -m pytest benchmarks -q -p no:cacheprovider --benchmark-disable

test-fast: build
	$(PY) -m ruff check .
	RESNET_FAST_REQUIRE_CUDA_BUILD=$(REQUIRE_CUDA) $(PY) -m pytest -m "not slow"

bench: build
	$(PY) -m resnet_fast.bench

bench-kernels: build
	$(PY) -m pytest benchmarks -p no:cacheprovider --benchmark-autosave --benchmark-columns=median,iqr,rounds

clean:
	rm -rf $(STAMPS) build *.egg-info resnet_fast/*.so
