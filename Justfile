# jax_ifmvse recipes. `just --list` shows them; the venv's tools come first on PATH.
export PATH := justfile_directory() + "/.venv/bin:" + env_var("PATH")

# Run the default (fast) test suite.
test *ARGS:
    python -m pytest -q {{ARGS}}

# Large-shape and long tests (full-size backbone parity and the like).
test-slow *ARGS:
    python -m pytest -q -m slow {{ARGS}}

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

# The whole pipeline on the built-in demo corpus with whisper-base + whisper-tiny.en (~10 min, 2 cores).
demo *ARGS:
    ifmvse demo {{ARGS}}

# All benchmarks (extraction, training, ensemble) in one table -> bench/results.md (~10 min).
bench:
    python bench/run_all.py

# The same at small shapes (a few minutes).
bench-quick:
    python bench/run_all.py --quick
