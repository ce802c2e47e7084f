"""Model optimization for the job's backend: fp16, fusion, int8/fp8 calibrated on the job's
own input, 2:4 sparsity, TensorRT's layer table, and an accuracy gate (docs/optimize.md).

Planning calls `optimize_plan` when the spec has `model.optimize`; `batch-infer optimize`
prints the report it leaves in `JobPlan.optimized`.
"""
