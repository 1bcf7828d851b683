# jax_ifmvse recipes. `just --list` shows them; the venv's tools come first on PATH.
export PATH := justfile_directory() + "/.venv/bin:" + env_var("PATH")

# Run the default (fast) test suite: 2 worker processes (one test file each at a time), the 25
# slowest tests listed at the end.
test *ARGS:
    python -m pytest -q -n 2 --dist loadfile --durations=25 {{ARGS}}

# The slow set: large shapes, long end-to-end runs (demo, GPU check smoke, fine-tuning subprocesses).
test-slow *ARGS:
    python -m pytest -q -m slow -n 2 --dist loadfile --durations=25 {{ARGS}}

# Build the docs site with warnings as errors into site/ (needs the `docs` extra).
docs:
    NO_MKDOCS_2_WARNING=1 mkdocs build --strict --site-dir site

# Lint with ruff.
lint:
    ruff check .
    ruff format --check .

# Format with ruff.
fmt:
    ruff format .
    ruff check --fix .

# Summarise a feature store (tables; add --json for JSON).
inspect STORE *ARGS:
    ifmvse inspect {{STORE}} {{ARGS}}

# The whole pipeline on the built-in demo corpus with whisper-base + whisper-tiny.en (4 to 8 min, 2 cores).
demo *ARGS:
    ifmvse demo {{ARGS}}

# All benchmarks (extraction, training, ensemble) in one table -> bench/results.md (~20 min).
bench:
    python bench/run_all.py

# The same at small shapes (a few minutes).
bench-quick:
    python bench/run_all.py --quick

# Download, here, the wheels the GPU machine's image lacks into .whl/ (ignored; < 40 MB).
gpu-wheels:
    python bench/gpu_check.py --download-wheels

# One-call GPU check: extraction, training, serving in one table (< 8 min on an H100/H200).
# On the GPU machine, with .whl/ carried: `python3 bench/gpu_check.py --out $OUT`.
gpu-check *ARGS:
    python bench/gpu_check.py {{ARGS}}

# Synthesize the demo corpus: just demo-corpus runs/corpus --n 300
demo-corpus OUT *ARGS:
    ifmvse demo-corpus --out {{OUT}} {{ARGS}}

# Fill a store: just extract --corpus DIR --backbone wavlm=microsoft/wavlm-large --out s.h5
extract *ARGS:
    ifmvse extract {{ARGS}}

# Train the heads: just train --store s.h5 --config paper --out runs/paper
train *ARGS:
    ifmvse train {{ARGS}}

# Ensemble weights on Development: just ensemble runs/paper
ensemble RUN *ARGS:
    ifmvse ensemble {{RUN}} {{ARGS}}

# Score a submission: just evaluate pred.csv --labels labels_consensus.csv --split Development
evaluate PRED *ARGS:
    ifmvse evaluate {{PRED}} {{ARGS}}

# Raw audio to scores: just predict a.wav b.wav --run runs/paper
predict *ARGS:
    ifmvse predict {{ARGS}}

# Serve a run over HTTP on 127.0.0.1:8000: just serve runs/demo/run (see README, `ifmvse serve`)
serve RUN *ARGS:
    ifmvse serve --run {{RUN}} {{ARGS}}
