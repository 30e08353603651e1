"""moecl benchmarks: MoE-CL against the baselines on the 4-task CL benchmark, and what the method costs.

Entry point: `python -m bench.run --preset smoke|cpu|cpu-full|gpu`. Every continual method runs through the
library's own step and evaluation (moecl.train.step.run_step, moecl.evaluate.evaluate_bank); the joint
multi-task upper bound has its own small trainer (bench/joint.py); the timing micro-benchmarks live in
bench/cost.py.
"""
