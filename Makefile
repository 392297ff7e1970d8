# Two commands do all set-up on a fresh machine:
#   make demo   - the built-in demonstration on synthetic chest radiographs
#   make test   - the test suite
# Both create .venv and install what they need. The CPU build of torch is pinned here;
# on a GPU machine install your CUDA build of torch into .venv first (make venv TORCH=...).

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin
BASE    = $(VENV)/.installed
TESTS   = $(VENV)/.installed-test

.PHONY: demo test venv clean

# the demo needs only the package; the tests add their extras (reference metrics, pydicom, Ray, pyarrow)
$(BASE): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e .
	touch $(BASE)

$(TESTS): $(BASE)
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(TESTS)

venv: $(BASE)

demo: $(BASE)
	$(BIN)/gradleak demo

# one worker per core (at most 4), each test file on one worker: module fixtures run once
test: $(TESTS)
	$(BIN)/python -m pytest -q --numprocesses=auto --maxprocesses=4 --dist loadfile

clean:
	rm -rf $(VENV) experiments .pytest_cache
