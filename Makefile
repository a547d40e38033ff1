# Common tasks. `make lint` and `make format` need ruff and clang-format (pip install ruff
# clang-format).
PYTHON ?= python
OUT ?= bench/results
CLANG_FORMAT ?= clang-format
CSRC := $(shell find csrc -name '*.cu' -o -name '*.cuh' -o -name '*.h' -o -name '*.cpp')

.PHONY: test test-gpu bench bench-gpu readme-table csrc-report lint format

test:  ## the CPU suite (Triton kernels run under the interpreter)
	$(PYTHON) -m pytest -q

test-gpu:  ## only the tests that need a CUDA GPU
	$(PYTHON) -m pytest -m gpu -q

bench:  ## MoE layer and routing-plan benchmarks (tiny shape on CPU, model shapes on a GPU)
	$(PYTHON) -m bench.moe_layer --out $(OUT)
	$(PYTHON) -m bench.routing_plan --out $(OUT)

bench-gpu:  ## GPU tests and benchmarks in one bounded run, logs and results in OUT
	bash bench/run_gpu.sh $(OUT)

readme-table:  ## regenerate the README benchmark table from bench/results/*.json
	$(PYTHON) -m bench.readme_table

csrc-report:  ## registers, stack (spills) and shared memory of every compiled kernel
	$(PYTHON) tests/csrc/compile_report.py

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(CLANG_FORMAT) --dry-run -Werror $(CSRC)

format:
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .
	$(CLANG_FORMAT) -i $(CSRC)
