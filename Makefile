# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test lint bench

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

demo: $(STAMP)
	$(VENV)/bin/durablecache demo

test: $(STAMP)
	bash scripts/system-deps.sh
	bash scripts/build-k8s-tools.sh
	$(VENV)/bin/ruff check operator tests bench
	$(VENV)/bin/mypy operator/durablecache
	$(VENV)/bin/pytest $(PYTEST_ARGS)

bench: $(STAMP)
	bash scripts/system-deps.sh
	$(PY) bench/copy.py
