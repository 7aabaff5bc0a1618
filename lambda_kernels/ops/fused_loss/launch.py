"""The fused GRPO-λ loss from hidden states: rows of the masked tokens only, one pass wherever the maths allows.

Three strategies, chosen per call (`fused_loss_forward`):

* on-policy (old_logprobs None), token plan: per chunk, logits → `onpolicy_rows_kernel` (ℓ, H, dlogits in place) →
  dX, dW GEMMs. The token gradient is known before the log-probs (grpo_lambda.md §5): 6·N·H·V FLOPs.
* off-policy (or on-policy with a KL weighted by the sequence's ratio, whose gradient needs the row's log-probs),
  token plan, every sequence fits a chunk: chunks hold whole sequences; per chunk, logits → ℓ and lse
  (`logprob_rows`) → the objective on those rows alone gives ∂loss/∂ℓ (rows do not interact, the normalisers are
  known from the mask) → dlogits over the same logits → GEMMs. Also 6·N·H·V FLOPs.
* otherwise (a sequence longer than a chunk, or the vocab plan under a memory budget): pass 1 computes ℓ for all
  tokens (`logprobs_forward`), the objective gives ∂loss/∂ℓ [B, T], pass 2 recomputes the logits
  (`logprobs_backward`, in the plan that fits): 8·N·H·V FLOPs.

Under a memory budget (960 MiB by default) the first two can run in the split plan (plan.py): their chunks sum dW
for the first plan.dw_rows vocabulary rows only and keep each token's lse and ∂loss/∂ℓ, from which a tail pass over
vocabulary slabs (`split_pipeline`) gives the other rows' dW.

Loss and metrics always come from the objective on the whole batch's ℓ. Padding costs nothing: tokens with mask 0
carry zero weight and zero gradient, so their rows are dropped before the GEMMs (but for the filler of an on-policy
first chunk queued ahead of the count, which gets zero inputs and adds nothing) and their grad_hidden rows are zero.
The real tokens' positions are found on the device; their per-row counts come from the argument check's one host
read, which the on-policy token chunks wait for only after their first chunk is queued (`_PiecesAhead`); nothing
else here syncs.
"""
from __future__ import annotations

import torch
import triton

from ..linear_logprobs import chunked_torch
from ..linear_logprobs.launch import dlogits_rows, grad_pipeline, logprob_rows, logprobs_backward, \
    logprobs_forward, plan_for, row_config, slab_dlogits, slab_dlogits_gemm, split_pipeline, stats_dtype, torch_rows
from ..linear_logprobs.logit_transform import LogitTransform
from ..linear_logprobs.lse_gemm import LseGemm, use_lse_gemm
from ..linear_logprobs.plan import memory_budget_bytes, piece_cap, pieces, split_size
from ..real_tokens import PendingRows, PendingTokens
from .kernels import onpolicy_rows_kernel, probs_dlogits_kernel
from .objectives import metric_names

PROBS_ROW_TILE = 4096  # columns per step of `probs_dlogits_kernel` (the row kernels' GPU tile)

def onpolicy_rows(rows_impl: str, logits, bias, tgt, g0, n, ref, beta: float, tf: LogitTransform, lp, ent, dl,
                  lse=None, g=None, kl_corrected: bool = False, g_ent=None) -> None:
    """ℓ (H) of a chunk and its dlogits for the token gradient g0 + β·n·(1 − exp(ref − ℓ)) (β·n·(ℓ − ref) for the
    ratio-weighted KL, `kl_corrected`) and, with g_ent (ent then given), the entropy's gradient g_ent, written into
    dl; with lse and g given, also each row's log-sum-exp and that token gradient."""
    if torch_rows(rows_impl, logits):
        chunked_torch.onpolicy_rows(logits, bias, tgt, g0, n, ref, beta, tf, lp, ent, dl, lse, g, kl_corrected,
                                    g_ent)
        return
    M, V = logits.shape
    block, warps = row_config(V)
    has_kl = ref is not None
    with_stats = lse is not None
    with_ent_grad = g_ent is not None
    onpolicy_rows_kernel[(M,)](
        logits, logits if bias is None else bias, tgt, g0, n if has_kl else g0, ref if has_kl else g0,
        g_ent if with_ent_grad else g0, lp, lp if ent is None else ent, lse if with_stats else lp,
        g if with_stats else lp, dl, logits.stride(0), dl.stride(0), V, *tf.kernel_args(), beta,
        HAS_BIAS=bias is not None, SOFTCAP=tf.capped, HAS_KL=has_kl, KL_CORRECTED=has_kl and kl_corrected,
        WITH_ENT=ent is not None, WITH_ENT_GRAD=with_ent_grad, WITH_STATS=with_stats, BLOCK_V=block,
        num_warps=warps)


def uses_probs_chunks(rows_impl: str, x, weight, tf: LogitTransform, g_ent) -> bool:
    """Whether the one-pass chunks take the probability-emitting Triton GEMM (`lse_gemm.LseGemm` with emit):
    wherever the log-prob passes take the Triton GEMM (LAMBDA_KERNELS_LOGPROBS_GEMM), so that the chunks' ℓ is
    bit-identical to theirs, except under a softcap or an entropy bonus, whose dlogits need each logit itself (those
    chunks keep cuBLAS logits and the row kernels)."""
    return use_lse_gemm(x, weight, rows_impl) and not tf.capped and g_ent is None


def emit_probs(gemm: LseGemm, cols: slice, x_c, dl, tgt, lp, lse, ent):
    """u [m, V] fp16 over dl's bytes ← the probabilities of a token chunk (the whole vocabulary: cols), with its
    rows' lp, lse (and ent) from the same tiles as the log-prob pass (`gemm.run` with emit); dlogits follow over u
    (`probs_dlogits`)."""
    assert cols.start == 0 and cols.stop == gemm.weight.shape[0], cols
    u = dl.view(torch.float16)
    gemm.run(x_c, tgt, lp, lse, ent, u)
    return u


def probs_dlogits(gemm: LseGemm, u, dl, tgt, lse, lp, g0, n, ref, beta: float, tf: LogitTransform,
                  kl_corrected: bool = False, g_out=None) -> None:
    """dl [m, V] ← the dlogits of a chunk whose probabilities `gemm.run` left in u [m, V] fp16 (dl may alias it),
    for the token gradient g0 [m] plus, with ref (and n), the on-policy KL term of `onpolicy_rows`; g_out [m]: that
    token gradient, stored (for a split plan's tail pass)."""
    M, V = dl.shape
    if M == 0:
        return
    width = gemm.range_width
    ranges = max(1, min(PROBS_ROW_TILE // width, triton.next_power_of_2(triton.cdiv(V, width))))
    has_kl = ref is not None
    probs_dlogits_kernel[(M,)](
        u, gemm.qm, tgt, lse, lp, g0, n if has_kl else g0, ref if has_kl else g0, g0 if g_out is None else g_out,
        dl, u.stride(0), gemm.qm.stride(0), dl.stride(0), V, tf.inv_t, beta, HAS_KL=has_kl,
        KL_CORRECTED=has_kl and kl_corrected, WITH_STATS=g_out is not None, RANGE=width, RANGES=ranges,
        num_warps=8 if ranges * width >= 2048 else 4)


def fused_loss_forward(hidden, weight, bias, ids, mask_f, adv, old, ref, pw, scales, objective, *, beta: float,
                       tf: LogitTransform, with_entropy: bool, rows_impl: str, need_dx: bool, need_dw: bool,
                       need_db: bool, tokens: PendingTokens, shard=None, bonus=None):
    """(loss 0-d fp32, metrics {name: 0-d fp32}, (dX [B, T, H], dW, db) for grad_output = 1, None where not needed).

    dW may come back as the fp32 sum of a half head (`dw_sum.HalfHeadGradSum`; token plan with
    LAMBDA_KERNELS_MEMORY_BUDGET=none): the backward scales and casts it in one pass (`finish`); otherwise every
    gradient is a tensor of its input's dtype.

    hidden [B, T, H] aligned with ids [B, T]; mask_f fp32 [B, T]; pw None or [B, T], the policy term's per-token
    weights; scales [B] fp32 (`row_scales`), n = mask·scale;
    objective: `objectives.KernelObjective` or `ReferenceObjective`. tokens: the tokens with mask ≠ 0
    (`real_tokens.PendingTokens`: their positions in the flattened [B·T] batch, on the device; each row's count from
    the id check's one host read, which raises on a bad id). The on-policy token-chunk pass queues its first chunk
    before it waits for that read (`_runs_ahead`); the other paths wait first. shard: a vocabulary-parallel head
    (`linear_logprobs.vocab_parallel`): always the two passes, whose log-prob statistics are combined over the group.
    bonus: an `entropy_bonus.EntropyBonus` (its gradient folded into every pass's dlogits) or None.
    """
    B, T, H = hidden.shape
    sdt = stats_dtype(hidden)
    flat_mask = mask_f.reshape(-1)
    x = hidden.reshape(B * T, H)  # every row: the passes gather the real ones piece by piece (no [N′, H] copy)
    need_grad = need_dx or need_dw or need_db
    # under a memory budget (the default) the fp32 dW sum of a half head is cast here, as the budget bounds what a
    # call holds; without one ("none") it is kept until the backward, which scales and casts it in place in one pass
    # (`dw_sum.HalfHeadGradSum`: its `rest`, 2·V·H bytes, lives on between forward and backward)
    cast_dw = memory_budget_bytes() is not None
    # the passes compute H where the metric or the bonus needs it, and fold the bonus's gradient g_ent into dlogits
    with_ent = with_entropy or bonus is not None
    g_ent = None if bonus is None or not need_grad else bonus.token_grad
    probs = uses_probs_chunks(rows_impl, hidden, weight, tf, g_ent)
    gemm_args = (weight, bias, objective, beta, tf, with_ent, rows_impl, need_dx, need_dw, need_db, cast_dw, probs)

    # on-policy, the token gradient is known before the log-probs unless its KL needs whole rows of them
    one_pass_on_policy = old is None and not objective.params.kl_needs_whole_rows
    ahead = None
    if need_grad and shard is None and one_pass_on_policy and _runs_ahead(rows_impl, hidden):
        # for all B·T rows: the real ones are at most that many
        ahead = plan_for(x, weight, need_dx, need_dw, probs=probs, rows_impl=rows_impl)
        if ahead.kind not in ("tokens", "split") or B * T <= ahead.max_rows:
            ahead = None  # (one chunk holds them all: the pass waits, so that it is one chunk of the real rows)
    if ahead is not None:
        # a row per entry of the positions, the real ones first: the pass learns their number after its first chunk
        batch = _Batch(x, ids, tokens.positions[: B * T], (B, T), mask_f, adv, old, ref, pw, scales, sdt, g_ent)
        lp_v, ent_v, (dx_v, dw, db) = _onpolicy_one_pass(batch, *gemm_args, ahead, tokens)
        n = batch.settle(tokens.count(), tokens.rows())
        lp_v, ent_v = lp_v[:n], (None if ent_v is None else ent_v[:n])
    else:
        batch = _Batch(x, ids, tokens.rows(), (B, T), mask_f, adv, old, ref, pw, scales, sdt, g_ent)  # (waits: read)
        plan = plan_for(batch.x, weight, need_dx, need_dw, n=batch.n, probs=probs, rows_impl=rows_impl) \
            if need_grad and shard is None else None
        chunked = plan is not None and plan.kind in ("tokens", "split")  # token chunks over the whole vocabulary
        sequences = whole_sequence_pieces(tokens.row_counts(), plan.max_rows) if chunked and not one_pass_on_policy \
            else None
        if chunked and one_pass_on_policy:
            lp_v, ent_v, (dx_v, dw, db) = _onpolicy_one_pass(batch, *gemm_args, plan)
        elif sequences is not None:
            lp_v, ent_v, (dx_v, dw, db) = _offpolicy_one_pass(batch, *gemm_args, sequences, plan)
        else:
            lp_v, ent_v, (dx_v, dw, db) = _two_passes(batch, *gemm_args, shard=shard)
    # loss and metrics of the whole batch (the passes above may have evaluated the objective on pieces of it)
    loss, metrics, _ = objective.evaluate(batch.full_logprobs(lp_v), old, adv, mask_f, ref, need_grad=False,
                                          weights=pw)

    if bonus is not None:  # (after `settle`: batch.real gives the real rows, as ent_v holds them)
        loss = loss + bonus.loss(batch.real(bonus.token_grad), ent_v).to(loss.dtype)
    metrics = dict(metrics)
    if with_entropy:
        m_v = flat_mask if batch.valid is None else flat_mask.index_select(0, batch.valid)
        metrics["entropy"] = ((m_v.to(sdt) * ent_v).sum() / flat_mask.sum().clamp(min=1.0)).to(torch.float32)
    dx = dx_v.reshape(B, T, H) if need_dx else None  # (every row: 0 at padding)
    metrics = {k: metrics[k].detach().to(torch.float32) for k in metric_names(objective.params, with_entropy)}
    return loss.to(torch.float32), metrics, (dx, dw, db)


def _runs_ahead(rows_impl: str, hidden) -> bool:
    """Whether the on-policy pass may queue its first chunk before the host knows the number of real tokens: its
    filler rows (padding, after the real ones) then reach the row kernel, which reads targets only through masked
    loads and compares (ids there may be anything); the PyTorch rows index with them, so they wait."""
    return rows_impl == "triton" and hidden.dtype != torch.float64


class _Batch:
    """The real tokens of a [B, T] batch and the per-token inputs of the loss. x: the hidden states of every token
    [B·T, H]; valid: the positions of the n rows the pass computes (None: every token, all real); tgt [n]: their
    targets; g_ent: the entropy bonus's ∂loss/∂H [B, T] (None without one, or without gradients). A pass that runs
    ahead of the count computes a row per entry of the positions, real ones first and then padding, until `settle`
    keeps the real ones."""

    def __init__(self, x, ids, valid, shape, mask_f, adv, old, ref, pw, scales, sdt, g_ent=None):
        tgt = ids.reshape(-1)
        self.tgt = (tgt if valid is None else tgt.index_select(0, valid)).contiguous()
        self.x = x if valid is not None else x.contiguous()
        self.valid, self.shape, self.n = valid, shape, self.tgt.shape[0]
        self.mask_f, self.adv, self.old, self.ref, self.pw = mask_f, adv, old, ref, pw
        self.scales, self.sdt = scales, sdt
        self.g_ent = g_ent  # [B, T] ∂loss/∂H of the entropy bonus, or None

    def settle(self, n: int, valid) -> int:
        """The real rows once their number n is known (valid: their positions, None when every token is real)."""
        self.n, self.valid, self.tgt = n, valid, self.tgt[:n]
        return n

    def real(self, full: torch.Tensor) -> torch.Tensor:
        """[B, T] → the values at the computed rows, [n] contiguous."""
        flat = full.reshape(-1)
        return (flat if self.valid is None else flat.index_select(0, self.valid)).contiguous()

    def full_logprobs(self, lp_v: torch.Tensor) -> torch.Tensor:
        return _scatter_logprobs(lp_v, self.valid, self.ref, self.shape, self.sdt, lp_v.device)

    def empty(self, with_it: bool = True):
        return torch.empty((self.n,), dtype=self.sdt, device=self.x.device) if with_it else None


class _PiecesAhead:
    """The row pieces of an on-policy pass that queues its first chunk before the host knows n, the number of real
    tokens: a whole chunk [0, cap) first (its rows past n are padding, made to add nothing: `live`), then the host
    waits for the id check's read (which raises on a bad id) and the rows [cap, n) follow in balanced pieces. The
    first chunk's GEMM runs while the host waits, instead of the GPU idling until the host has queued it."""

    def __init__(self, tokens: PendingTokens, cap: int):
        self.tokens, self.most = tokens, cap

    def __iter__(self):
        cap = self.most
        yield slice(0, cap)
        rest = self.tokens.count() - cap
        if rest > 0:
            yield from (slice(cap + sl.start, cap + sl.stop) for sl in pieces(rest, split_size(rest, cap)))


def _onpolicy_one_pass(batch: _Batch, weight, bias, objective, beta, tf, with_entropy, rows_impl,
                       need_dx, need_dw, need_db, cast_dw, probs, plan, ahead: PendingTokens | None = None):
    """ahead: the pass runs ahead of the count of real tokens (`_PiecesAhead`): batch has a row per entry of the
    positions, and the filler rows past the real ones get zero inputs (hidden state, token gradient, KL weight and
    ℓ_ref), so their dlogits are exactly 0 and they add nothing, whatever the padding holds.
    probs: the chunks go through the probability-emitting Triton GEMM (`uses_probs_chunks`), else cuBLAS logits
    and `onpolicy_rows`."""
    lp_v, ent_v = batch.empty(), batch.empty(with_entropy)
    live = None if ahead is None else ahead.live()
    row_pieces = plan.rows if ahead is None else _PiecesAhead(ahead, piece_cap(plan.max_rows))
    split = plan.kind == "split"
    lse_v, g_v = batch.empty(split), batch.empty(split)  # what the split plan's tail pass needs
    gent_v = batch.empty(batch.g_ent is not None)  # (filled at the first chunk, as the token gradient)
    tgt = batch.tgt
    token = {}  # the per-token inputs of the row kernel, prepared at its first call

    def prepare_tokens():
        if not token:
            # after the first logits GEMM is queued, so that this host work (a dozen small launches, the trace
            # kernel among them) overlaps it instead of leaving the GPU idle before it
            def rows_of(full):
                v = batch.real(full.to(batch.sdt))
                return v if live is None else torch.where(live, v, 0.0)

            token["g0"] = rows_of(objective.onpolicy_grad(batch.adv, batch.mask_f, batch.scales, batch.pw))
            if gent_v is not None:
                gent_v.copy_(rows_of(batch.g_ent))
            token["n"] = token["ref"] = None
            if beta > 0:
                token["n"] = rows_of(batch.mask_f * batch.scales.unsqueeze(1))
                token["ref"] = rows_of(batch.ref)

    def row_fn(sl, _cols, logits, dl):  # one slab: the whole vocabulary
        prepare_tokens()
        n_v, ref_v = token["n"], token["ref"]
        onpolicy_rows(rows_impl, logits, bias, tgt[sl], token["g0"][sl], None if n_v is None else n_v[sl],
                      None if ref_v is None else ref_v[sl], beta, tf, lp_v[sl],
                      None if ent_v is None else ent_v[sl], dl, *((lse_v[sl], g_v[sl]) if split else (None, None)),
                      kl_corrected=objective.params.kl_bias_correction,
                      g_ent=None if gent_v is None else gent_v[sl])

    chunk_fn = None
    if probs:
        gemm = LseGemm(weight, bias, tf, ent_v is not None, _chunk_capacity(plan, batch), emit=True)
        lse_c = None if split else batch.empty()  # (each chunk's lse, where no tail keeps them)

        def chunk_fn(sl, cols, x_c, dl):
            lse_s = (lse_v if split else lse_c)[sl]
            u = emit_probs(gemm, cols, x_c, dl, tgt[sl], lp_v[sl], lse_s, None if ent_v is None else ent_v[sl])
            prepare_tokens()  # (after the first GEMM is queued, as in row_fn)
            n_v, ref_v = token["n"], token["ref"]
            probs_dlogits(gemm, u, dl, tgt[sl], lse_s, lp_v[sl], token["g0"][sl], None if n_v is None else n_v[sl],
                          None if ref_v is None else ref_v[sl], beta, tf, objective.params.kl_bias_correction,
                          g_v[sl] if split else None)

    if split:
        tail_args = (bias, tgt, lse_v, None if gent_v is None else ent_v, g_v, gent_v, tf)
        return lp_v, ent_v, split_pipeline(batch.x, weight, bias, row_fn, slab_dlogits(rows_impl, *tail_args),
                                           need_dx, need_db, row_pieces, rows_impl, plan, batch.valid, live,
                                           None if ahead is None else ahead.rows,  # (the tail: real rows only)
                                           chunk_dlogits=chunk_fn, tail_dlogits=_tail_gemm(rows_impl, batch.x,
                                                                                           weight, tail_args))
    return lp_v, ent_v, grad_pipeline(batch.x, weight, bias, row_fn, need_dx, need_dw, need_db, row_pieces,
                                      rows_impl, cast_dw=cast_dw, rows=batch.valid, live=live,
                                      chunk_dlogits=chunk_fn)


def _tail_gemm(rows_impl: str, x, weight, tail_args):
    """The split plan's tail through the Triton GEMM's dlogits epilogue wherever the log-prob passes take that GEMM
    (softcap and entropy bonus included: the tail knows each row's lse), else None (cuBLAS logits and the row
    kernel). tail_args: `slab_dlogits`'s after rows_impl."""
    return slab_dlogits_gemm(weight, *tail_args) if use_lse_gemm(x, weight, rows_impl) else None


def _chunk_capacity(plan, batch: _Batch) -> int:
    """The most rows a token chunk of `plan` over the batch's rows can hold (the buffers of its Triton GEMM)."""
    return max(1, min(max(plan.rows, plan.max_rows), batch.tgt.shape[0]))


def whole_sequence_pieces(counts, max_tokens: int):
    """Consecutive sequences packed into chunks of ≤ max_tokens real tokens: [(rows, tokens)] slices (of the batch
    rows and of the real tokens in order), or None when one sequence alone has more. counts: real tokens per row."""
    if max(counts, default=0) > max_tokens:
        return None
    pieces, b0, t0, n = [], 0, 0, 0
    for b, c in enumerate(counts):
        if n + c > max_tokens:
            pieces.append((slice(b0, b), slice(t0, t0 + n)))
            b0, t0, n = b, t0 + n, 0
        n += c
    pieces.append((slice(b0, len(counts)), slice(t0, t0 + n)))
    return [p for p in pieces if p[1].stop > p[1].start]


def _offpolicy_one_pass(batch: _Batch, weight, bias, objective, beta, tf, with_entropy, rows_impl,
                        need_dx, need_dw, need_db, cast_dw, probs, sequences, plan):
    B, T = batch.shape
    lp_v, lse_v, ent_v = batch.empty(), batch.empty(), batch.empty(with_entropy)
    split = plan.kind == "split"
    g_full = batch.empty(split)  # each token's gradient, for the split plan's tail pass
    gent_v = None if batch.g_ent is None else batch.real(batch.g_ent.to(batch.sdt))
    ent_g = None if gent_v is None else ent_v  # H where the entropy's gradient needs it
    rows_of = {tokens.start: rows for rows, tokens in sequences}
    tgt, old, ref = batch.tgt, batch.old, batch.ref
    positions = torch.arange(B * T, device=batch.x.device) if batch.valid is None else batch.valid

    def token_grad(sl):  # ∂loss/∂ℓ of a chunk's tokens, from their ℓ (lp_v[sl]) and the rest of their sequences
        rows = rows_of[sl.start]
        local = positions[sl] - rows.start * T  # the chunk's tokens within its block of rows
        lp_block = (ref[rows].to(batch.sdt).clone() if ref is not None else
                    torch.zeros((rows.stop - rows.start, T), dtype=batch.sdt, device=lp_v.device))
        lp_block.view(-1).index_copy_(0, local, lp_v[sl])
        g = objective.rows_grad(lp_block, None if old is None else old[rows], batch.adv[rows], batch.mask_f[rows],
                                None if ref is None else ref[rows], batch.scales[rows],
                                None if batch.pw is None else batch.pw[rows])
        g_v = g.reshape(-1).index_select(0, local).to(batch.sdt).contiguous()
        if split:
            g_full[sl] = g_v
        return g_v

    def row_fn(sl, _cols, logits, dl):  # one slab: the whole vocabulary
        logprob_rows(rows_impl, logits, bias, tgt[sl], tf, lp_v[sl], lse_v[sl], None if ent_v is None else ent_v[sl])
        g_v = token_grad(sl)
        dlogits_rows(rows_impl, logits, bias, tgt[sl], lse_v[sl], None if ent_g is None else ent_g[sl], g_v,
                     None if gent_v is None else gent_v[sl], tf, dl)

    chunk_fn = None
    if probs:
        gemm = LseGemm(weight, bias, tf, ent_v is not None, _chunk_capacity(plan, batch), emit=True)

        def chunk_fn(sl, cols, x_c, dl):
            u = emit_probs(gemm, cols, x_c, dl, tgt[sl], lp_v[sl], lse_v[sl], None if ent_v is None else ent_v[sl])
            probs_dlogits(gemm, u, dl, tgt[sl], lse_v[sl], lp_v[sl], token_grad(sl), None, None, 0.0, tf)

    pieces = [tokens for _, tokens in sequences]
    if split:
        tail_args = (bias, tgt, lse_v, ent_g, g_full, gent_v, tf)
        return lp_v, ent_v, split_pipeline(batch.x, weight, bias, row_fn, slab_dlogits(rows_impl, *tail_args),
                                           need_dx, need_db, pieces, rows_impl, plan, batch.valid,
                                           chunk_dlogits=chunk_fn,
                                           tail_dlogits=_tail_gemm(rows_impl, batch.x, weight, tail_args))
    return lp_v, ent_v, grad_pipeline(batch.x, weight, bias, row_fn, need_dx, need_dw, need_db, pieces, rows_impl,
                                      cast_dw=cast_dw, rows=batch.valid, chunk_dlogits=chunk_fn)


def _two_passes(batch: _Batch, weight, bias, objective, beta, tf, with_entropy, rows_impl,
                need_dx, need_dw, need_db, cast_dw, _probs=False, shard=None):
    rows = None if batch.valid is None else PendingRows(batch.x.shape[0], batch.valid, lambda: batch.n)
    lp_v, lse_v, ent_v = logprobs_forward(batch.x, weight, bias, batch.tgt, tf, with_entropy, rows_impl, shard,
                                          rows)
    grads = (None, None, None)
    if need_dx or need_dw or need_db:
        _, _, g = objective.evaluate(batch.full_logprobs(lp_v), batch.old, batch.adv, batch.mask_f, batch.ref,
                                     need_grad=True, weights=batch.pw)
        gent_v = None if batch.g_ent is None else batch.real(batch.g_ent.to(batch.sdt))
        grads = logprobs_backward(batch.x, weight, bias, batch.tgt, lse_v, None if gent_v is None else ent_v,
                                  batch.real(g), gent_v, tf, rows_impl, need_dx, need_dw, need_db, shard,
                                  cast_dw=cast_dw, rows=batch.valid)
    return lp_v, ent_v, grads


def _scatter_logprobs(lp_v, valid, ref, shape, dtype, device):
    """[B, T] log-probs: the computed ones at real tokens; at padding ℓ_ref (KL exactly 0 there) or 0."""
    if valid is None:
        return lp_v.reshape(shape)
    full = ref.to(dtype).reshape(-1).clone() if ref is not None else torch.zeros(
        (shape[0] * shape[1],), dtype=dtype, device=device)
    full.index_copy_(0, valid, lp_v)
    return full.reshape(shape)
