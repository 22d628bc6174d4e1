"""Helpers for tests and benchmarks that compare fastlora with PyTorch (optional: imports torch lazily)."""
