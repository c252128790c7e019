# README's two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Extras the test suite needs; a domain adds its extra here when its tests land.
TEST_EXTRAS ?= test,llm,parity,rl,generative,audio
DEMO ?= kl_estimators
DEMO_PRESET ?= smoke
comma := ,

.PHONY: demo test test-sweep install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip

$(VENV)/.installed-base: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[$(TEST_EXTRAS)]"
	touch $@ $(VENV)/.installed-base $(foreach e,$(subst $(comma), ,$(TEST_EXTRAS)),$(VENV)/.installed-$(e))

install: $(VENV)/.installed-base

# The demo installs the extra its experiment declares in experiments/registry.py
# (`python -m experiments extra NAME` prints it), once per extra and again when
# pyproject.toml changes.
demo: $(VENV)/.installed-base
	@extra=$$($(PY) -m experiments extra $(DEMO)) || exit 2; \
	stamp=$(VENV)/.installed-$$extra; \
	if [ -n "$$extra" ] && { [ ! -f $$stamp ] || [ pyproject.toml -nt $$stamp ]; }; then \
		echo "installing the '$$extra' extra that $(DEMO) needs"; \
		$(PY) -m pip install --quiet -e ".[$$extra]" && touch $$stamp || exit 1; \
	fi
	$(PY) -m experiments run $(DEMO) --preset $(DEMO_PRESET) --run-dir runs/demo-$(DEMO)-$(DEMO_PRESET)-$$(date +%Y%m%d-%H%M%S)

# pytest exits 5 when it collects nothing: that must fail, never pass quietly. The slowest
# tests and the reasons for skips are listed at the end, so a CI log shows where time went.
# pytest-xdist runs one worker per core (at most 4: each holds a few GB); `PYTEST_ARGS=-n0`
# runs in one process. The registry-wide kill/resume sweep is part of it (it shares each
# experiment's smoke run with that experiment's own tests); `make test-sweep` runs it alone.
test: $(VENV)/.installed-test
	@$(PY) -m pytest -n auto --maxprocesses 4 --dist worksteal --durations=30 -rs $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-sweep: $(VENV)/.installed-test
	$(PY) -m pytest tests/experiments/test_kill_resume_sweep.py -n auto --maxprocesses 4 -rs -v $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
