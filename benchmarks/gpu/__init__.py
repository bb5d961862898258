"""GPU suite sections: each module has `run() -> list[dict]` (see benchmarks/gpu_suite.py)."""
