"""Benchmark helpers for llumnix_kv (peer transfer engines used as baselines)."""
