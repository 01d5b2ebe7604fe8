"""Libraries of launch/bench_net.py: the benchmark matrix (plan) and its tables and plots (report)."""
