"""grpo_trainer: a thin GRPO / GRPO-λ trainer built on lambda_kernels."""
