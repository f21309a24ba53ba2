"""Data generators (synthetic benchmarks)."""
