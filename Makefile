# make demo: a local cluster distributing a real file peer to peer.  make test: the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv debs demo test bench lab clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# Debian packages that tests run for real (network namespaces, servers, clients): installed when
# missing and when we are root (CI is); otherwise the tests that need them say what is missing.
DEBS := iproute2 curl wget docker-registry skopeo apache2-utils containerd openssl tmux

debs:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "not root: the tests that need$$missing will say so"; fi; \
	fi

demo: $(STAMP)
	$(BIN)/python tools/demo.py

test: $(STAMP) debs
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python tools/bench.py

# make lab LAB_ARGS="--peers 16 --size-mib 64 --slow-half-up-mbit 20": the shaped network lab (root)
LAB_ARGS ?= --peers 8 --size-mib 64
lab: $(STAMP)
	$(BIN)/python tools/netlab.py run $(LAB_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
