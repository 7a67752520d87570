"""Benchmarks over many runs (`bench`) and reports of run directories (`report`)."""
