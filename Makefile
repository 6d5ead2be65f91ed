# Quick start: `make demo` (the main job) and `make test` (the suite). Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup chromium demo test clean

setup: $(STAMP) chromium

# Debian's chromium, for the atlas's browser test (tests/test_atlas.py skips, naming it, when it is missing)
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -qq chromium || { apt-get update -qq && apt-get install -y -qq chromium; }; \
	else echo "note: chromium is missing (as root: apt-get install chromium); the atlas's browser test will skip"; fi

# Reinstall only when the package metadata changes; editable install picks up code edits.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# setuptools always notes that an editable install maps folders (eval/ -> unconfuse.eval): expected here
	PYTHONWARNINGS='ignore:Editable installation' $(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/unconfuse demo

test: setup
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(BIN)/python -m pytest --durations=20  # the slowest tests: the suite must stay under 20 min

clean:
	rm -rf $(VENV) build *.egg-info
