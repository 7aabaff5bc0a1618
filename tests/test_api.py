import lambda_kernels
from lambda_kernels import reference


def test_public_names_are_pinned():
    assert sorted(lambda_kernels.__all__) == sorted([
        "group_advantages", "lambda_trace", "gae", "grpo_lambda_loss", "GRPOLambdaLoss",
        "linear_logprobs", "fused_grpo_lambda_loss", "FusedGRPOLambdaLoss",
    ])
    for name in lambda_kernels.__all__:
        assert getattr(lambda_kernels, name).__doc__, f"{name} needs a docstring"


def test_every_function_has_a_reference_with_the_same_signature():
    import inspect

    for name in ["group_advantages", "lambda_trace", "gae", "grpo_lambda_loss", "linear_logprobs",
                 "fused_grpo_lambda_loss"]:
        ours = inspect.signature(getattr(lambda_kernels, name)).parameters
        ref = inspect.signature(getattr(reference, name)).parameters
        assert [p for p in ours if p != "impl"] == list(ref), name


def test_importing_does_not_import_triton():
    """`import lambda_kernels` must not import triton: TRITON_INTERPRET may still be set after it."""
    import subprocess
    import sys

    code = "import sys, lambda_kernels; sys.exit(1 if 'triton' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
