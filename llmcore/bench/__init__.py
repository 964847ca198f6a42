"""Benchmark harnesses shared by `llmcore bench ...` and the pytest-benchmark suites."""
