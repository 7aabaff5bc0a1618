"""Issue 3's targets checked against a run's fused-loss rows (`bench_fused_loss.main`): one verdict per target and
shape, so that a GPU run says at once which targets it met (`gpu_check.py` writes the table into RESULTS.md).

Targets (bf16, median, time over the floor at the matmul rate measured in the same run, N = B·T), each with at most
1 GiB of extra memory:
  on-policy fused loss fwd+bwd ≤ 1.10 × 6·N·H·V (the library's defaults, `ours_on`, or the same with the
  Triton-GEMM chunks forced, `ours_on_tma`: the table names the row judged);
  off-policy ≤ 1.45 × 6·N·H·V (`ours_off`, `ours_off_tma`);
  linear_logprobs under no_grad ≤ 1.10 × 2·N·H·V (the best of the log-prob providers, the one a trainer would pick).
"""
from __future__ import annotations

MAX_EXTRA_GIB = 1.0
# (target, providers whose best row is judged, × floor at most)
TARGETS = (
    ("on-policy fwd+bwd", ("ours_on", "ours_on_tma"), 1.10),
    ("off-policy fwd+bwd", ("ours_off", "ours_off_tma"), 1.45),
    ("no-grad log-probs", ("ours_logprobs", "ours_logprobs_masked", "ours_logprobs_masked_tma"), 1.10),
)


def verdicts(rows: list[dict]) -> list[dict]:
    """One dict per (target, shape) with a row for it: the best provider, its × floor and extra memory, and met."""
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for target, providers, bound in TARGETS:
            timed = [r for r in rows if r["shape"] == shape and r["provider"] in providers and "error" not in r]
            if not timed:
                continue
            within = [r for r in timed if r["peak_extra_gib"] <= MAX_EXTRA_GIB]
            best = min(within or timed, key=lambda r: r["over_floor"])  # the fastest within the memory bound
            met = best["over_floor"] <= bound and best["peak_extra_gib"] <= MAX_EXTRA_GIB
            out.append(dict(target=target, shape=shape, provider=best["provider"], over_floor=best["over_floor"],
                            bound=bound, peak_extra_gib=best["peak_extra_gib"], met=met))
    return out


def markdown_table(rows: list[dict]) -> str:
    lines = [f"| target | shape | best provider | × floor | bound | extra GiB (≤ {MAX_EXTRA_GIB:.0f}) | met |",
             "|---|---|---|---|---|---|---|"]
    for v in verdicts(rows):
        lines.append(f"| {v['target']} | {v['shape']} | {v['provider']} | {v['over_floor']:.2f} | ≤ {v['bound']:.2f} | "
                     f"{v['peak_extra_gib']:.2f} | {'yes' if v['met'] else '**no**'} |")
    return "\n".join(lines)


def test_verdicts_pick_the_best_provider_and_apply_both_bounds():
    def row(shape, provider, over, extra=0.5):
        return dict(shape=shape, provider=provider, over_floor=over, peak_extra_gib=extra, ms=1.0, floor_ms=1.0)

    rows = [row("7b", "ours_on", 1.08, extra=1.3), row("7b", "ours_off", 1.40), row("7b", "naive", 0.9),
            row("7b", "ours_logprobs", 1.09), row("7b", "ours_logprobs_masked", 1.05, extra=3.0),
            dict(shape="7b", provider="ours_logprobs_masked_tma", error="OutOfMemoryError"),
            row("1.5b", "ours_on", 1.12)]
    got = {(v["target"], v["shape"]): v for v in verdicts(rows)}
    assert set(got) == {("on-policy fwd+bwd", "7b"), ("off-policy fwd+bwd", "7b"), ("no-grad log-probs", "7b"),
                        ("on-policy fwd+bwd", "1.5b")}
    assert not got["on-policy fwd+bwd", "7b"]["met"]  # fast enough, but 1.3 GiB extra
    assert got["off-policy fwd+bwd", "7b"]["met"]
    logprobs = got["no-grad log-probs", "7b"]  # the faster masked row holds 3 GiB: the unmasked one is judged
    assert logprobs["provider"] == "ours_logprobs" and logprobs["met"]
    assert not got["on-policy fwd+bwd", "1.5b"]["met"]
    table = markdown_table(rows)
    assert "| on-policy fwd+bwd | 7b | ours_on | 1.08 | ≤ 1.10 | 1.30 | **no** |" in table
    assert "| no-grad log-probs | 7b | ours_logprobs | 1.09 | ≤ 1.10 | 0.50 | yes |" in table
