"""Benchmarks: each one a module run from the repository root, ``python -m bench.NAME --help``.

They print what they measure; the figures quoted in doc/results.md come from them.
"""
