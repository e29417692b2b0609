"""Benchmarks behind ``implicit bench ...``; each writes ``experiments/results/<name>.json``."""
