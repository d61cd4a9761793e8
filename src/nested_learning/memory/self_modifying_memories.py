"""The five self-modifying memories of Eq 83-93 for one Eq-90 chunk, for matrix memories and for Eq 89 MLPs.

Both classes own the slow initial values (Eq 72-73) and the static gate biases, and expose
``initial_state(batch, device, dtype) -> list[Tensor]`` and ``chunk(S_c, S, x, q) -> (o, S_new)`` where ``S_c`` is the
chunk-start state (every memory evaluation of Eq 90 uses it), ``S`` the running state, ``x, q: (B, n, H, dh)`` the
per-head inputs and normalised queries, and ``o: (B, n, H, dh)`` is o_t = M_{memory,t-1}(q_t) read from the running
state before token t's write (the delta-rule op's read="before"). Gates: eta_t = sigmoid(M_eta(x_t) + b_eta),
alpha_t = sigmoid(M_alpha(x_t) + b_alpha). Objectives: L = -<M(k), v_hat> ("dot") or 1/2 ||M(k) - v_hat||^2 ("l2").
Values: v_t = normalize(M_v(x_t)) when ``value_norm`` (the default), else M_v(x_t). With ``value_norm`` the matrix
memories' self-generated values are bounded too (``_Memories.bounded``); the Eq 89 MLP memories' values
v_hat = v + W1 sigma(W2 v) are bounded the same way with ``bounded_targets`` (the default), see
``MLPSelfModifyingMemories``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import delta_rule
from ..ops.delta_rule_one_chunk import delta_rule_one_chunk

BOXES = ("k", "v", "memory", "eta", "alpha")
RETENTIONS = ("initial", "zero")


class _Memories(nn.Module):
    def __init__(
        self,
        n_heads: int,
        head_dim: int,
        objective: str,
        eta_bias,
        alpha_bias,
        op_mode: str,
        value_norm: bool,
    ):
        super().__init__()
        self.n_heads, self.head_dim, self.objective, self.op_mode = n_heads, head_dim, objective, op_mode
        self.value_norm = value_norm
        bias = torch.tensor([float(eta_bias), float(alpha_bias)])
        self.gate_bias = nn.Parameter(
            bias.repeat(n_heads, 1)
        )  # (H, 2): static biases of the eta, alpha logits

    def values(self, v: torch.Tensor) -> torch.Tensor:
        # the targets v_hat = M(v_t) scale with v_t and feed back into the memories that produce v_t; unit values
        # keep that loop from amplifying (without it a random layer diverges on long inputs)
        return F.normalize(v, dim=-1) if self.value_norm else v

    def gates(self, eta_logit: torch.Tensor, alpha_logit: torch.Tensor):
        """(B, n, H) logits -> eta_t, alpha_t in (0, 1)."""
        bias = self.gate_bias.to(eta_logit.dtype)
        return torch.sigmoid(eta_logit + bias[:, 0]), torch.sigmoid(alpha_logit + bias[:, 1])

    def bounded(self, v_hat: torch.Tensor) -> torch.Tensor:
        """Bounded self-generated values (with ``value_norm``): v_hat_box = normalize(M_box,c v_t) for the dh-wide
        boxes (k, v, memory) and tanh(M_box,c v_t) for the one-dimensional gate boxes (eta, alpha).

        Why: the matrix memories' objective (Eq 92-93) is homogeneous in M -- the targets are M's own outputs -- so
        it leaves the memories' scale undetermined, and the per-chunk map M_c -> M_{c+1} is linear in M_c. On long
        streams the scale then drifts exponentially, up or down with the input statistics: an untrained HOPE tiny's
        two layers went from |S| ~ 20 to 1e19 (inf) and to exactly 0 within 20k tokens. Bounded targets fix the
        scale: the l2 objective's minimiser has unit outputs, as q_t, k_t, v_t are unit vectors, and the DGD
        transition alpha I - eta k k^T has norm <= 1, so the memory stays bounded and cannot decay to 0 while its
        own outputs are non-zero."""
        if not self.value_norm:
            return v_hat
        dh = self.head_dim
        main = F.normalize(v_hat[..., : 3 * dh].unflatten(-1, (3, dh)), dim=-1).flatten(-2)
        return torch.cat([main, torch.tanh(v_hat[..., 3 * dh :])], dim=-1)

    def _delta(self, q, k, v, eta, alpha, S, chunk):
        return delta_rule(
            q, k, v, eta, alpha, initial_state=S, chunk_size=chunk, mode=self.op_mode, read="before"
        )


class LinearSelfModifyingMemories(_Memories):
    """Matrix memories (Eq 92-93), stacked: state ``[S]`` with ``S: (B, H, 3*dh + 2, dh)``, rows
    ``[M_k; M_v; M_memory; M_eta; M_alpha]``.

    The memories share k_t, eta_t and alpha_t, so one delta rule updates them all:
        S_t = S_{t-1}(alpha_t I - eta_t k_t k_t^T) + eta_t v'_t k_t^T,
        v' = v_hat (dot: -grad = v_hat k^T)   or   v' = v_hat - S_c k_t (l2, grad at S_c),
        v_hat = bounded(S_c v_t) with ``value_norm`` (unit k, v, memory values, tanh gate values), else S_c v_t.
    """

    def __init__(self, n_heads, head_dim, objective, eta_bias, alpha_bias, op_mode, value_norm):
        super().__init__(n_heads, head_dim, objective, eta_bias, alpha_bias, op_mode, value_norm)
        dh = head_dim
        # M_k, M_v, M_memory start as random maps; M_eta, M_alpha at zero so the gates begin at their biases
        initial = torch.randn(n_heads, 3 * dh + 2, dh) / dh**0.5
        initial[:, 3 * dh :] = 0.0
        self.initial = nn.Parameter(initial)
        self.rows = {box: slice(i * dh, (i + 1) * dh) for i, box in enumerate(BOXES[:3])}
        self.rows.update(eta=slice(3 * dh, 3 * dh + 1), alpha=slice(3 * dh + 1, 3 * dh + 2))

    def initial_state(self, batch: int, device=None, dtype=torch.float32) -> list[torch.Tensor]:
        return [self.initial.unsqueeze(0).expand(batch, *self.initial.shape).to(device=device, dtype=dtype)]

    def chunk(self, S_c, S, x, q):
        (S_c,), (S,) = S_c, S
        r = self.rows
        proj = torch.einsum("bhrd,bthd->bthr", S_c, x)  # every memory reads x_t at the chunk-start state
        k = F.normalize(proj[..., r["k"]], dim=-1)
        v = self.values(proj[..., r["v"]])
        eta, alpha = self.gates(proj[..., r["eta"]].squeeze(-1), proj[..., r["alpha"]].squeeze(-1))
        v_hat = self.bounded(torch.einsum("bhrd,bthd->bthr", S_c, v))  # v_hat_box = M_box,c v_t for all boxes
        if self.objective == "l2":  # v_hat - M_c k: the gradient taken at the chunk-start memory (Eq 90)
            target = v_hat - torch.einsum("bhrd,bthd->bthr", S_c, k)
        else:
            target = v_hat
        o, S = self._delta(q, k, target, eta, alpha, S, x.shape[1])
        return o[..., r["memory"]], [S]


class MLPSelfModifyingMemories(_Memories):
    """Eq 89 memories ``M_box(x) = x + W1 sigma(W2 x)`` (k, v, memory: dh -> dh) and ``W1 sigma(W2 x)`` (eta, alpha:
    dh -> 1, no residual since the shapes differ), hidden width ``hidden``, updated by DGD layer by layer.

    Each linear layer W (input a, output gradient delta, both at the chunk-start weights, Eq 90) gets the DGD step of
    Eq 56-57 / 88 with its own input as key:  W <- W (alpha I - eta_a a a^T) - eta_a delta a^T.
    W2's input is the unit key k_t, so eta_a = eta_t (as in Eq 88); W1's input h = sigma(W2 k_t) is not normalised,
    so it takes the exact Sherman-Morrison step eta_a = eta_t / (1 + eta_t ||h||^2), which keeps the transition's
    eigenvalues in (alpha - 1, alpha]. The W2 layers of all five memories share the key k_t and are stacked into one
    delta rule; the W1 layers have a key per memory (its own h) and run as extra heads.

    Retention (``retention="initial"``, the default; our choice): the step above decays W toward 0 (the alpha I term,
    a pull toward W = 0), and for these memories W = 0 is absorbing: at W1 = W2 = 0 every memory is the identity
    (k_t = v_t = normalize(x_t)), the errors vanish and nothing is written again. An untrained HOPE tiny's memories
    reached exactly 0 within 1,024 tokens. We decay toward the meta-learned initial weights W_0 (Eq 72-73) instead:
        W <- W (alpha I - eta_a a a^T) - eta_a delta a^T + (1 - alpha) W_0,
    i.e. the same DGD on W - W_0 with the value -(delta + W_0 a); ``retention="zero"`` is Eq 88 as written.

    Bounded targets (``bounded_targets=True``, the default; our addition, False gives Eq 89's targets as they are):
    v_hat = normalize(M_c(v_t)) for k, v, memory and tanh(M_c(v_t)) for the gates, as the matrix memories' targets
    with ``value_norm``. Why: the targets are the memories' own outputs, so they grow with W2; the W2 step eta_t is
    sized for the unit key alone, not for the gradient's path through W1, and a large enough W2 then grows by a factor
    per chunk. A random layer with its memory weights scaled by 3 reached |W2| ~ 6e22 and NaN within 1,024 tokens
    (``test_bounded_targets_keep_the_mlp_memories_bounded``), and so did HOPE tiny at step 130 of the demo's training
    once only its backward's rounding changed (W2 from 0.6 to 1e3 in four chunks of one window, 3e27 by the window's
    end); with bounded targets |W2| stays below 1.1 and 0.81 there.

    State ``[W2, W1, G1]``: ``W2: (B, H, 5*hidden, dh)`` (rows box-major), ``W1: (B, 3*H, dh, hidden)`` (k, v, memory;
    box-major heads), ``G1: (B, 2*H, 1, hidden)`` (eta, alpha).
    """

    def __init__(self, n_heads, head_dim, objective, eta_bias, alpha_bias, op_mode, value_norm, hidden=None,
                 retention="initial", bounded_targets=True):
        super().__init__(n_heads, head_dim, objective, eta_bias, alpha_bias, op_mode, value_norm)
        if retention not in RETENTIONS:
            raise ValueError(f"retention must be one of {RETENTIONS}, got {retention!r}")
        self.retention = retention
        self.bounded_targets = bool(bounded_targets)
        dh = head_dim
        self.hidden = hid = 2 * dh if hidden is None else hidden
        self.w2 = nn.Parameter(torch.randn(n_heads, 5 * hid, dh) / dh**0.5)
        self.w1 = nn.Parameter(torch.randn(3, n_heads, dh, hid) * (0.5 / hid**0.5))
        # the gate memories' output layer starts at zero: the gates begin at their biases
        self.g1 = nn.Parameter(torch.zeros(2, n_heads, 1, hid))

    def initial_state(self, batch: int, device=None, dtype=torch.float32) -> list[torch.Tensor]:
        def expand(p):
            return p.unsqueeze(0).expand(batch, *p.shape).to(device=device, dtype=dtype)

        return [expand(self.w2), expand(self.w1).flatten(1, 2), expand(self.g1).flatten(1, 2)]

    def _evaluate(self, W2, W1, G1, u):
        """All five memories at fixed weights on u: (B, n, H, dh). Returns z, h: (B, n, 5, H, hid), main outputs
        (B, n, 3, H, dh) and gate outputs (B, n, 2, H, 1)."""
        H = u.shape[2]
        z = torch.einsum("bhrd,bthd->bthr", W2, u).unflatten(-1, (5, self.hidden)).transpose(2, 3)
        h = F.gelu(z)
        main = u.unsqueeze(2) + torch.einsum("bsdk,btsk->btsd", W1, h[:, :, :3].flatten(2, 3)).unflatten(
            2, (3, H)
        )
        gate = torch.einsum("bsdk,btsk->btsd", G1, h[:, :, 3:].flatten(2, 3)).unflatten(2, (2, H))
        return z, h, main, gate

    def chunk(self, S_c, S, x, q):
        W2c, W1c, G1c = S_c
        W2, W1, G1 = S
        n, H = x.shape[1], x.shape[2]
        _, _, px, gx = self._evaluate(W2c, W1c, G1c, x)
        k = F.normalize(px[:, :, 0], dim=-1)
        v = self.values(px[:, :, 1])
        eta, alpha = self.gates(gx[:, :, 0, :, 0], gx[:, :, 1, :, 0])
        _, _, v_main, v_gate = self._evaluate(W2c, W1c, G1c, v)  # v_hat_box = M_box,c(v_t)
        if self.bounded_targets:
            v_main, v_gate = bound_targets(v_main, v_gate)
        zk, hk, out_main, out_gate = self._evaluate(W2c, W1c, G1c, k)
        if self.objective == "l2":  # dL/dM(k) at the chunk-start weights
            e_main, e_gate = out_main - v_main, out_gate - v_gate
        else:
            e_main, e_gate = -v_main, -v_gate
        # output gradients of the W2 layers: sigma'(z) * (W1^T e), per memory
        back = torch.cat(
            [
                torch.einsum("bsdk,btsd->btsk", W1c, e_main.flatten(2, 3)).unflatten(2, (3, H)),
                torch.einsum("bsdk,btsd->btsk", G1c, e_gate.flatten(2, 3)).unflatten(2, (2, H)),
            ],
            dim=2,
        )
        delta2 = torch.ops.aten.gelu_backward(back, zk).transpose(2, 3).flatten(3)  # (B, n, H, 5*hid)
        toward = self.retention == "initial"
        if toward:  # DGD on W - W_0 (the retention's fixed point), W_0 added back on reads and to the new state
            W2_0, W1_0, G1_0 = self.initial_state(x.shape[0], W2.device, W2.dtype)
            W2, W1, G1 = W2 - W2_0, W1 - W1_0, G1 - G1_0
            delta2 = delta2 + torch.einsum("bhrd,bthd->bthr", W2_0, k)
        o2, W2 = self._delta(q, k, -delta2, eta, alpha, W2, n)
        if toward:
            o2, W2 = o2 + torch.einsum("bhrd,bthd->bthr", W2_0, q), W2 + W2_0
        hq = F.gelu(o2[..., 2 * self.hidden : 3 * self.hidden])  # sigma(W2_memory,t-1 q_t)

        def sm_step(h):  # Sherman-Morrison step for the unnormalised inputs h: (B, n, s*H, hid)
            e = eta.repeat(1, 1, h.shape[2] // H)
            return e / (1 + e * h.pow(2).sum(-1))

        h_main, h_gate = hk[:, :, :3].flatten(2, 3), hk[:, :, 3:].flatten(2, 3)
        err_main, err_gate = e_main.flatten(2, 3), e_gate.flatten(2, 3)
        if toward:
            err_main = err_main + torch.einsum("bsdk,btsk->btsd", W1_0, h_main)
            err_gate = err_gate + torch.einsum("bsdk,btsk->btsd", G1_0, h_gate)
        queries = torch.cat([torch.zeros_like(hq), torch.zeros_like(hq), hq], dim=2)  # only M_memory is read
        o1, W1 = self._delta(queries, h_main, -err_main, sm_step(h_main), alpha.repeat(1, 1, 3), W1, n)
        _, G1 = self._delta(
            torch.zeros_like(h_gate), h_gate, -err_gate, sm_step(h_gate), alpha.repeat(1, 1, 2), G1, n
        )
        read = o1[:, :, 2 * H :]
        if toward:
            read = read + torch.einsum("bsdk,btsk->btsd", W1_0[:, 2 * H :], hq)
            W1, G1 = W1 + W1_0, G1 + G1_0
        return q + read, [W2, W1, G1]

    # ------------------------------------------------------------------ fused form
    # The same chunk step as ``chunk``, in a layout made for it: memories box-major and transposed, R = W^T,
    #   R2: (5, M, dh, hid)   R1: (3, M, hid, dh)   RG: (2, M, hid, 1)      with M = B * H,
    # per-head inputs (M, n, dh), and ``delta_rule_one_chunk`` for the three DGD steps. Every product is then one
    # batched matmul over (box, batch, head) with no permute inside the chunk loop, and only the memory box is read.
    # ``fused_layout`` / ``state_layout`` convert once per call.

    def fused_layout(self, S: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """[W2, W1, G1] in the state layout -> (R2, R1, RG) in the fused one."""
        W2, W1, G1 = S
        B, H, hid, dh = W2.shape[0], self.n_heads, self.hidden, self.head_dim
        R2 = W2.reshape(B, H, 5, hid, dh).permute(2, 0, 1, 4, 3).reshape(5, B * H, dh, hid)
        R1 = W1.reshape(B, 3, H, dh, hid).permute(1, 0, 2, 4, 3).reshape(3, B * H, hid, dh)
        RG = G1.reshape(B, 2, H, 1, hid).permute(1, 0, 2, 4, 3).reshape(2, B * H, hid, 1)
        return R2, R1, RG

    def state_layout(self, R: tuple[torch.Tensor, ...], batch: int) -> list[torch.Tensor]:
        """Inverse of ``fused_layout``."""
        R2, R1, RG = R
        B, H, hid, dh = batch, self.n_heads, self.hidden, self.head_dim
        W2 = R2.reshape(5, B, H, dh, hid).permute(1, 2, 0, 4, 3).reshape(B, H, 5 * hid, dh)
        W1 = R1.reshape(3, B, H, hid, dh).permute(1, 0, 2, 4, 3).reshape(B, 3 * H, dh, hid)
        G1 = RG.reshape(2, B, H, hid, 1).permute(1, 0, 2, 4, 3).reshape(B, 2 * H, 1, hid)
        return [W2.contiguous(), W1.contiguous(), G1.contiguous()]

    def fused_chunk(self, R_c, R, x, q, R_0, gate_bias, step=None):
        """``chunk`` in the fused layout: x, q: (M, n, dh); R_c, R: chunk-start and running memories; R_0: the
        initial memories (retention "initial") or None; gate_bias: (M, 2). Returns o: (M, n, dh) and the new R.
        ``step``: the function that computes it (``fused_chunk_step``, or a compiled copy of it)."""
        step = fused_chunk_step if step is None else step
        return step(R_c, R, x, q, R_0, gate_bias, self.objective, self.value_norm, self.bounded_targets)


def _fused_evaluate(R, u):
    """All five memories at fixed weights R on u: (M, m, dh). Returns z, h: (5, M, m, hid), the main outputs
    (3, M, m, dh) and the gate outputs (2, M, m)."""
    R2, R1, RG = R
    z = u @ R2
    h = F.gelu(z)
    return z, h, u + h[:3] @ R1, (h[3:] @ RG).squeeze(-1)


def bound_targets(main: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The MLP memories' self-generated targets bounded as ``_Memories.bounded`` bounds the matrix memories': unit
    dh-wide outputs (k, v, memory), tanh of the gate outputs (eta, alpha)."""
    return F.normalize(main, dim=-1), torch.tanh(gate)


def fused_chunk_step(R_c, R, x, q, R_0, gate_bias, objective: str, value_norm: bool, bounded_targets: bool = False):
    """One Eq 90 chunk of the Eq 89 MLP memories in the fused layout (``MLPSelfModifyingMemories.fused_chunk``): the
    arithmetic of ``MLPSelfModifyingMemories.chunk``, which it equals (tests). A pure function of tensors, so that one
    compiled copy serves every layer. ``bounded_targets``: ``bound_targets`` on the self-generated targets (the
    layers pass their setting, True by default; False here keeps Eq 89's targets as they are)."""
    n = x.shape[1]
    _, _, px, gx = _fused_evaluate(R_c, x)
    k = F.normalize(px[0], dim=-1)
    v = F.normalize(px[1], dim=-1) if value_norm else px[1]
    eta = torch.sigmoid(gx[0] + gate_bias[:, :1])
    alpha = torch.sigmoid(gx[1] + gate_bias[:, 1:])
    z, h, main, gate = _fused_evaluate(R_c, torch.cat([v, k], dim=1))  # v_hat = M_c(v_t) and M_c(k_t)
    zk, hk = z[:, :, n:], h[:, :, n:]
    v_main, v_gate = main[:, :, :n], gate[:, :, :n]
    if bounded_targets:
        v_main, v_gate = bound_targets(v_main, v_gate)
    if objective == "l2":  # dL/dM(k) at the chunk-start weights
        e_main, e_gate = main[:, :, n:] - v_main, gate[:, :, n:] - v_gate
    else:
        e_main, e_gate = -v_main, -v_gate
    _, R1c, RGc = R_c
    back = torch.cat([e_main @ R1c.mT, e_gate.unsqueeze(-1) @ RGc.mT])  # W1^T e per memory: (5, M, n, hid)
    delta2 = torch.ops.aten.gelu_backward(back, zk)
    R2, R1, RG = R
    err_main, err_gate = e_main, e_gate.unsqueeze(-1)
    if R_0 is not None:  # DGD on W - W_0, W_0 added back on reads and to the new state
        R2_0, R1_0, RG_0 = R_0
        R2, R1, RG = R2 - R2_0, R1 - R1_0, RG - RG_0
        delta2 = delta2 + k @ R2_0
        err_main, err_gate = err_main + hk[:3] @ R1_0, err_gate + hk[3:] @ RG_0
    o2, R2 = delta_rule_one_chunk(k, -delta2, eta, alpha, R2, q, read_from=2)
    if R_0 is not None:
        o2 = o2 + q @ R2_0[2]
    hq = F.gelu(o2)  # sigma(W2_memory,t-1 q_t)
    step = eta / (1 + eta * hk.pow(2).sum(-1))  # Sherman-Morrison step for the unnormalised inputs h
    o1, R1 = delta_rule_one_chunk(hk[:3], -err_main, step[:3], alpha, R1, hq, read_from=2)
    _, RG = delta_rule_one_chunk(hk[3:], -err_gate, step[3:], alpha, RG)
    if R_0 is not None:
        o1 = o1 + hq @ R1_0[2]
        R2, R1, RG = R2 + R2_0, R1 + R1_0, RG + RG_0
    return q + o1, (R2, R1, RG)
