"""Libraries of the benchmarks: bench_net's matrix (plan) and its tables and plots (report); the result document every cell-by-cell benchmark writes (record)."""
