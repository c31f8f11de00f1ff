# The two commands a newcomer needs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install compiled demo test unit bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: compiled

# The hot modules as C extensions (shared/compiled.py): only those whose source changed are rebuilt;
# any that cannot be built run as Python source.
compiled: $(STAMP)
	@$(BIN)/python -c 'import shared.compiled as c; c.build()'

demo: compiled
	$(BIN)/omnicrm up

test: compiled
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15

unit: compiled
	$(BIN)/python -m pytest -q tests/unit

bench: compiled
	$(BIN)/python -m bench

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf .omnicrm
