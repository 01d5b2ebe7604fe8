"""Scripts run by other scripts (launch/gpu_check.sh), not by users directly."""
