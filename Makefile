# Two commands matter: `make demo` (the main job on the bundled defaults) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install bench bench-speed bench-flextron bench-encoder clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU torch first, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/elastiformer demo --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/elastiformer bench --overwrite

# wall-clock against executed FLOPs, per component and budget (prefill, decode at batch 1 and 8): a quiet machine
bench-speed: $(STAMP)
	$(BIN)/elastiformer bench-speed --config bench/configs/speed.yaml

# Flextron routers on SmolLM2 (needs the sorted + continued-trained checkpoints of `elastiformer flextron sort|train`)
bench-flextron: $(STAMP)
	$(BIN)/elastiformer flextron bench
	$(BIN)/elastiformer flextron bench --readme

bench-encoder: $(STAMP)
	$(BIN)/elastiformer bench --task encoder --overwrite
	$(BIN)/elastiformer bench --task encoder --readme

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
