# Two commands do all the set-up on a fresh machine: `make demo` and `make test`. `make deps` is the part
# of `make test` that installs what is not Python: system packages (valkey/redis servers, openssl, Go)
# and the Kubernetes test binaries built from tools/k8s; each step prints what it does.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: build deps demo test lint bench faults conformance

# The proxy's modules run compiled (mypyc, setup.py); rebuilt in place whenever their sources change.
COMPILED := $(VENV)/.compiled
COMPILED_SRC := setup.py $(shell sed -n -E 's/.*"(operator\/[^"]*\.(py|c))",$$/\1/p' setup.py)

# Installed at the versions constraints.txt pins (the image installs the runtime ones the same way),
# so a release upstream never changes what the tests run against.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	DURABLECACHE_PURE_PYTHON=1 $(PY) -m pip install -q --constraint constraints.txt -e '.[test]'
	@touch $@

$(COMPILED): $(STAMP) $(COMPILED_SRC)
	$(PY) setup.py -q build_ext --inplace --force
	@touch $@

build: $(COMPILED)

demo: $(COMPILED)
	$(VENV)/bin/durablecache demo

deps:
	bash scripts/system-deps.sh
	bash scripts/build-k8s-tools.sh

test: deps $(COMPILED)
	$(VENV)/bin/ruff check operator tests bench setup.py
	$(VENV)/bin/mypy operator/durablecache
	$(VENV)/bin/pytest $(PYTEST_ARGS)
	$(PY) tests/conformance/run.py

# The fault-injection matrix (docs/reliability.md): every fault x phase cell, a Markdown table at the end.
faults: $(COMPILED)
	$(PY) tests/faults/matrix.py $(FAULTS_ARGS)

# valkey-py's own test suite against Valkey 9 directly and through the proxy (tests/conformance/run.py).
conformance: $(COMPILED)
	$(PY) tests/conformance/run.py $(CONFORMANCE_ARGS)

bench: $(COMPILED)
	bash scripts/system-deps.sh
	$(PY) bench/copy.py
