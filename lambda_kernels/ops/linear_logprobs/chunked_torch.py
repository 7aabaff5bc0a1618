"""Row operations on one logits chunk in plain PyTorch: the `impl="torch"` twin of kernels.py.

Same contract as the Triton kernels (fp32 in, fp32 statistics out, dlogits written into `dl`), used by the same
chunk pipeline in launch.py, so CPU users without Triton never hold more than one chunk of logits either. Temporaries
are a few chunk-sized fp32 tensors.
"""
from __future__ import annotations

import math

import torch

from .logit_transform import LogitTransform


def _finite(logp: torch.Tensor) -> torch.Tensor:
    """log p with −inf (p = 0, a −inf logit) replaced by 0, so that p·log p is 0 there, not NaN."""
    return torch.where(torch.isfinite(logp), logp, torch.zeros((), dtype=logp.dtype, device=logp.device))


def _tempered(logits: torch.Tensor, bias, tf: LogitTransform, with_slope: bool = False):
    """z, the sampling logits of the head's outputs x = logits (+ bias); with_slope: (z, ∂z/∂x), the derivative a
    number, or a tensor where soft-capped. At most two chunk-sized temporaries live at once (in-place tanh)."""
    x = logits if bias is None else logits + bias.to(logits.dtype)
    if tf.softcap is None:
        z = x * tf.inv_t
        return (z, tf.inv_t) if with_slope else z
    th = torch.div(x, tf.softcap).tanh_()
    del x
    if not with_slope:
        return th.mul_(tf.softcap * tf.inv_t)
    z = th * (tf.softcap * tf.inv_t)
    return z, th.square_().neg_().add_(1.0).mul_(tf.inv_t)  # 1/τ·(1 − tanh²), in th's bytes


def logprob_rows(logits, bias, tgt, tf: LogitTransform, lp, lse, ent):
    """Fill lp, lse (and ent when not None) [M] fp32 from logits [M, V] fp32."""
    z = _tempered(logits, bias, tf)
    row_lse = torch.logsumexp(z, dim=1)
    lse.copy_(row_lse)
    # a target outside [0, V) (another rank's, in a vocabulary-parallel head) reads a clamped column: that ℓ is
    # discarded by the caller, as the Triton kernel's masked load is
    t = tgt.long().clamp(0, logits.shape[1] - 1)
    lp.copy_((z.gather(1, t.unsqueeze(1)).squeeze(1) - row_lse).clamp(max=0.0))
    if ent is not None:  # H = log s − t/s, s = Σ e^(z−m), t = Σ e^(z−m)·(z − m), as the kernel: no z − lse, whose
        # cancellation (an ulp of the largest logit) would swamp a confident row's small H
        d = z - z.amax(dim=1, keepdim=True)
        e = d.exp()
        s = e.sum(dim=1)
        h = s.log() - (e * _finite(d)).sum(dim=1) / s
        ent.copy_(h.clamp(min=0.0, max=math.log(logits.shape[1])))


def dlogits_rows(logits, bias, tgt, lse, ent, g_lp, g_ent, tf: LogitTransform, dl):
    """dl [M, V] (may alias logits) ← (g_lp·(onehot − p) − g_ent·p·(log p + H))·∂z/∂x (1/temperature, times
    1 − tanh² where soft-capped).

    A target outside [0, V) adds no one-hot term: a vocabulary slab holds the targets of only some rows.
    """
    z, slope = _tempered(logits, bias, tf, with_slope=True)
    logp = z.sub_(lse.unsqueeze(1))  # (z is ours: a temporary, never the caller's logits)
    del z
    p = logp.exp()
    dz = -g_lp.unsqueeze(1) * p
    t = tgt.long()
    in_slab = (t >= 0) & (t < logits.shape[1])
    dz.scatter_add_(1, t.clamp(0, logits.shape[1] - 1).unsqueeze(1), (g_lp * in_slab).unsqueeze(1))
    if g_ent is not None:
        dz -= g_ent.unsqueeze(1) * p * (_finite(logp) + ent.unsqueeze(1))
    dl.copy_(dz.mul_(slope))


def onpolicy_rows(logits, bias, tgt, g0, n, ref, beta: float, tf: LogitTransform, lp, ent, dl, lse=None, g=None,
                  kl_corrected: bool = False, g_ent=None):
    """Log-probs (and entropy), then dlogits for g = g0 + β·n·∂kl/∂ℓ (KL only when ref is given): 1 − exp(ref − ℓ),
    or ℓ − ref for the ratio-weighted KL (`kl_corrected`, at ratio 1), and the entropy's gradient g_ent when given
    (ent then given too); lse and g, when given, receive each row's log-sum-exp and that token gradient."""
    row_lse = torch.empty_like(lp) if lse is None else lse
    logprob_rows(logits, bias, tgt, tf, lp, row_lse, ent)
    if ref is None:
        row_g = g0
    else:
        kl_grad = lp - ref if kl_corrected else 1.0 - torch.exp(ref - lp)
        row_g = g0 + torch.where(n != 0, beta * n * kl_grad, 0.0)
    if g is not None:
        g.copy_(row_g)
    dlogits_rows(logits, bias, tgt, row_lse, ent, row_g, g_ent, tf, dl)
