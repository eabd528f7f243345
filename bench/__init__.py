"""On-demand benchmarks (not part of the test suite). Run ``python bench/bench_spine.py``."""
