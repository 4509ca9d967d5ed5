"""Command-line tools (data preparation, benchmarks, verification); importable for tests."""
