# One entry point for a fresh machine with only Python 3.11 and make:
#   make serve    create .venv, install, and serve the bundled model: the age API and its page at http://127.0.0.1:8000
#   make test     create .venv, install everything (and Debian's chromium for the browser test), run the whole suite
# Re-running is quick: the install step is redone only when pyproject.toml or this file changes.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FACENET := facenet-pytorch==2.6.0
# The web page's test drives the system's Chromium (Debian's package) with Playwright; nothing is downloaded.
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install serve test unit quick clean

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# facenet-pytorch pins torch<2.3, numpy<2 and Pillow<10.3 but runs on current versions:
	# install it without its pins; its real needs (requests, tqdm) come from pyproject.toml.
	$(BIN)/python -m pip install --quiet --no-deps $(FACENET)
	touch $(STAMP)

install: $(STAMP)

$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "error: the web page test needs Chromium at $(CHROMIUM) (Debian's chromium package)"; exit 1; }
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }

# The quick start's main job: `c3ae serve` on an embedded local Ray with the bundled model; Ctrl-C stops it.
serve: install
	$(BIN)/c3ae serve

# pytest exits 5 when it collected no test: that is a failure here, said in words.
test: install $(CHROMIUM)
	@$(BIN)/python -m pytest tests --durations=15; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; fi; exit $$rc

# The unit layer alone: no Ray, no subprocesses, about a minute.
unit: install
	$(BIN)/python -m pytest tests -m unit

# Everything but the tests marked slow (full-dataset measurements, a two-node cluster): about half the time.
quick: install $(CHROMIUM)
	$(BIN)/python -m pytest tests -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info
