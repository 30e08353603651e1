"""moecl benchmarks: MoE-CL against the baselines on the 4-task CL benchmark, and what the method costs.

Entry point: `python -m bench.run --preset smoke|cpu|cpu-full|gpu`. Every run goes through the library's own
step, training loop and evaluation (bench/runs.py); the cost figures time the library's own training step
(bench/cost.py).
"""
