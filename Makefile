# Common tasks. `make lint` and `make format` need ruff (pip install ruff).
PYTHON ?= python
OUT ?= bench/results

.PHONY: test test-gpu bench bench-gpu readme-table lint format

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

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .
