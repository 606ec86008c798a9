# dn2: `make demo` installs everything and runs the main job on a small real
# image store; `make test` installs everything and runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO ?= demo

.PHONY: setup demo test lint bench

setup: $(VENV)/.installed

# Debian's Fashion-MNIST (the demo's real images) and Chromium (report tests).
/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz /usr/bin/chromium:
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist chromium >/dev/null

$(VENV)/.installed: setup.py pyproject.toml /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz /usr/bin/chromium
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(PY) -m benchmarks.demo_store --output $(DEMO)/store
	$(VENV)/bin/dn2 run --normal $(DEMO)/store/normal --input $(DEMO)/store/incoming.csv \
	  --output $(DEMO)/out --top 20 --report
	@echo "ranked table: $(DEMO)/out/results/anomalies-*.parquet"
	@echo "top 20:       $(DEMO)/out/results/top_anomalies.csv"
	@echo "report:       $(DEMO)/out/results/report.html"

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest -q

bench: setup
	$(PY) benchmarks/embed_speed.py
	$(PY) benchmarks/library_auc.py
