"""One-off tools (checkpoint conversion and its check, the documentation's figures): each one a
module run from the repository root, ``python -m scripts.NAME --help``."""
