# make demo: a local cluster distributing a real file peer to peer.  make test: the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench lab clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python tools/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python tools/bench.py

# make lab LAB_ARGS="--peers 16 --size-mib 64 --slow-half-up-mbit 20": the shaped network lab (root)
LAB_ARGS ?= --peers 8 --size-mib 64
lab: $(STAMP)
	$(BIN)/python tools/netlab.py run $(LAB_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
