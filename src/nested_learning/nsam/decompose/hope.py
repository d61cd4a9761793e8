"""HOPE and HOPE-attention re-run from their levels (Eq 94-97, 70-71).

Per block: the mixer at its own level (self-modifying Titans at 1/C, run by its module, whose DGD rule has its own
token-loop references; or attention's KV cache at frequency infinity), then the CMS chain (Eq 70) whose level l is
a residual MLP with its own weights theta_l. The stream is cut into segments of C_min tokens; on each segment every
level's gradient of the segment's next-token loss (Eq 8-9; pairs inside the segment) is taken by autograd with all
the model's computation in between, accumulated, and at level l's boundary (every C_l tokens) theta_l takes Eq 71's
step, the proximal step of Eq 20 on the chunk (rate eta_l / C_l, inside the module's trust region of ``grad_clip``):

    theta_l <- argmin_Phi <Phi - theta_l, sum_chunk grad> + ||Phi - theta_l||^2 / (2 eta_l / C_l)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nested_learning.models.cms_lm import CMSLanguageModel

from ..proximal import linearized_step


def _linear(W: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per-stream W u: W (B, out, in), u (B, S, in) -> (B, S, out)."""
    return torch.einsum("boi,bsi->bso", W, u)


def _mlp_branch(u: torch.Tensor, theta: list[torch.Tensor]) -> torch.Tensor:
    """MLP_l(u) - u per stream: W_down gelu(W_up u + b_up) + b_down (GELU form, 4 tensors) or
    W_down (silu(W_gate u) * W_up u) (SwiGLU form, 3 tensors); u: (B, S, d)."""
    if len(theta) == 3:
        W_gate, W_up, W_down = theta
        return _linear(W_down, F.silu(_linear(W_gate, u)) * _linear(W_up, u))
    W_up, b_up, W_down, b_down = theta
    return _linear(W_down, F.gelu(_linear(W_up, u) + b_up[:, None])) + b_down[:, None]


class CMSLevel:
    """Level l of one block: its fast weights, its gradient accumulator, its period C and rate eta."""

    def __init__(self, cms, lv: int, batch: int):
        up, down = cms.up[lv], cms.down[lv]
        if cms.form.name == "swiglu":
            slow = (cms.gate_proj[lv].weight, up.weight, down.weight)
        else:
            slow = (up.weight, up.bias, down.weight, down.bias)
        self.theta = [t.detach().expand(batch, *t.shape).clone() for t in slow]
        self.initial = [t.clone() for t in self.theta]  # the slow (meta-learned) initial state, Eq 72-73
        self.acc = [torch.zeros_like(t) for t in self.theta]
        self.period, self.clip = cms.chunk_sizes[lv], cms.grad_clip
        self.eta = float(cms.max_inner_lr * torch.sigmoid(cms.lr_logit[lv].detach()))

    def boundary_step(self) -> None:
        mean = [a / self.period for a in self.acc]
        scale = 1.0
        if self.clip is not None:  # the module's trust region: the step on the chunk is at most eta * clip long
            norm = torch.sqrt(sum(m.flatten(1).pow(2).sum(1) for m in mean))
            scale = self.clip / norm.clamp_min(self.clip)
        new = []
        for th, m in zip(self.theta, mean):
            g = m * scale.reshape(-1, *[1] * (m.dim() - 1)) if self.clip is not None else m
            new.append(linearized_step(lambda p, g=g: (p * g).sum(), th, self.eta))
        self.theta, self.acc = new, [torch.zeros_like(a) for a in self.acc]


def hope_from_levels(model: CMSLanguageModel, ids: torch.Tensor) -> torch.Tensor:
    """``model(ids).logits`` of a CMS language model (HOPE, HOPE-attention, a hopeified pretrained LM) with the "lm"
    objective and the "sequential" or "nested" variant, recomputed from the levels. ids: (B, T) -> logits."""
    layers = model.cms_layers()
    cms0 = layers[0]
    if model.objective != "lm" or any(c.variant not in ("sequential", "nested") for c in layers):
        raise ValueError("the decomposition covers the 'lm' objective with the 'sequential' or 'nested' variant")
    if any(t in ("direct", "generate") for c in layers for t in c.transfers):
        raise ValueError("the decomposition covers the transfers 'init' and 'backprop' (same forward)")
    B, T = ids.shape
    C_min = cms0.segment_size
    levels = [[] if b.cms is None else [CMSLevel(b.cms, lv, B) for lv in range(b.cms.n_levels)]
              for b in model.blocks]
    mixers = [s.detach() for s in model.initial_state(B, ids.device).mixers]
    logits = []
    for a in range(0, T, C_min):
        seg = ids[:, a : a + C_min]
        with torch.enable_grad():
            thetas = [[[t.detach().requires_grad_() for t in lv.theta] for lv in blk] for blk in levels]
            x = model.embed(seg)
            new_mixers = []
            for block, ms, blk_thetas in zip(model.blocks, mixers, thetas):
                y, ms = block.mixer(block.norm1(x), ms)
                x = x + y
                u = block.norm2(x)
                if block.cms is None:  # a plain (frozen) MLP
                    x = x + block.mlp(u)
                    new_mixers.append(ms)
                    continue
                chain = u
                for theta in blk_thetas:
                    chain = chain + _mlp_branch(chain, theta)
                x = x + (chain - u)
                new_mixers.append(ms)
            out = model.head(model.norm(x))
            logits.append(out.detach())
            if seg.shape[1] < C_min or not model.test_time_updates:
                mixers = [m.detach() for m in new_mixers]
                continue
            loss = F.cross_entropy(out[:, :-1].flatten(0, 1), seg[:, 1:].flatten(), reduction="sum")
            flat = [t for blk in thetas for th in blk for t in th]
            grads = iter(torch.autograd.grad(loss, flat))
        end = a + C_min
        for block, blk in zip(model.blocks, levels):
            for lv in blk:
                lv.theta = [t.detach() for t in lv.theta]
                lv.acc = [acc + next(grads) for acc in lv.acc]
                if end % lv.period == 0:
                    lv.boundary_step()
            if blk and cms0.variant == "nested":  # Eq 72-73: slowest first, a faster level restarts from the slower one
                for s in range(len(blk) - 2, -1, -1):
                    if end % blk[s + 1].period == 0:
                        slower = blk[s + 1]
                        if block.cms.nested_init == "copy":
                            blk[s].theta = [t.clone() for t in slower.theta]
                        else:  # theta_s^0 + lambda_s (theta_{s+1} - theta_{s+1}^0)
                            lam = float(torch.sigmoid(block.cms.nested_logit[s].detach()))
                            blk[s].theta = [own + lam * (t - t0) for own, t, t0 in
                                            zip(blk[s].initial, slower.theta, slower.initial)]
                        blk[s].acc = [torch.zeros_like(t) for t in blk[s].acc]
        mixers = [m.detach() for m in new_mixers]
    return torch.cat(logits, dim=1)
