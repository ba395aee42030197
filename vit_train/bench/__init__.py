"""Benchmarks against the reference implementations (timm, HF transformers); run with `python -m`."""
