"""Helpers shared by the test suite and the benchmarks: a generated mail-shaped zone and knotd."""
