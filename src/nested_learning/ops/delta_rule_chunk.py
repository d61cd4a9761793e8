"""Chunk-parallel form of the delta rule (Eq 65/88/93) via the WY (UT) representation.

Inside a chunk of C tokens starting from state S_0, write the update as
    S_t = alpha_t S_{t-1} + u_t k_t^T,   u_t = eta_t (v_t - S_{t-1} k_t)
so that, with gamma_t = prod_{i <= t} alpha_i (inside the chunk),
    S_t = gamma_t S_0 + sum_{i <= t} (gamma_t / gamma_i) u_i k_i^T.
Substituting S_{t-1} into u_t gives a unit-lower-triangular system for the rows of U (C, Dv):
    (I + L) U = diag(eta) V - diag(eta gamma_prev) K S_0^T,   L[t, i] = eta_t (gamma_{t-1} / gamma_i) k_t.k_i  (i < t)
With the chunk's UT transform T = (I + L)^{-1} (one inverse per chunk, independent of S_0), U = W1 - W2 S_0^T with
W1 = T diag(eta) V and W2 = T diag(eta gamma_prev) K, and the chunk's end state is
    S_C = gamma_C S_0 + U^T K_tail,   K_tail[i] = (gamma_C / gamma_i) k_i,
i.e. in the transposed state R = S^T that every product here works on, an affine map per chunk
    R_C = A R_0 + Bc,   A = gamma_C I - K_tail^T W2  (Dk, Dk),   Bc = K_tail^T W1  (Dk, Dv).
Everything except that recurrence over chunks is batched over all chunks at once: the inverses, the C x C
products, A and Bc. The recurrence is one (Dk, Dk) @ (Dk, Dv) product per chunk (``chunk_scan``, with a
hand-written backward of one product per chunk as well). Outputs, again batched:
    read="after":  o_t = gamma_t S_0 q_t + sum_{i <= t} (gamma_t / gamma_i) (q_t.k_i) u_i
    read="before": o_t = gamma_{t-1} S_0 q_t + sum_{i < t} (gamma_{t-1} / gamma_i) (q_t.k_i) u_i
i.e. O = Q_inter R_0 + P U = (Q_inter - P W2) R_0 + P W1 with P the masked, decayed Q K^T.

Decay ratios gamma_t / gamma_i come from log-cumsums g = log gamma. When every chunk's log-decay range |g_C| is
small enough that exp(+-g) stays far from overflow, they are factored as exp(g_t) exp(-g_i) into the row and
column scales of the matmuls (no C x C exp); otherwise the masked differences exp(g_t - g_i) are formed directly,
which is exact for any alpha in (0, 1].

Groups: on CPU the chunks go through those batched steps a group at a time (``chunks_per_group``: groups whose
intermediates stay in one core's L2 cache), the state carried from one group to the next; with factored decays each
group is one autograd node with a hand-written backward (``delta_rule_chunk_grad``), else autograd differentiates
``_chunk_group``.

Layout: chunk-major, (N, B*H, C, D), so that the per-chunk recurrence reads and writes contiguous (B*H, D, D)
slices. Products read transposed operands as views (on this CPU build batched X @ Y^T runs as fast as X @ Y at
these sizes), so no operand is copied only to be transposed.
"""

from __future__ import annotations

import torch

from ._common import chunk_log_decay, decay_matrix, factored_decay_ok, to_chunks
from ._common import scale_rows as _rows
from .cpu import l2_cache_bytes, mkl_generic_path
from .threads import one_thread_if_threads_sleep as _one_thread
from .threads import threads_sleep_between_ops


def unit_lower_inverse_reference(L: torch.Tensor) -> torch.Tensor:
    """(I + tril(L, -1))^{-1} by one triangular solve per matrix, L: (..., C, C) (only the strict lower part is
    read). Autograd differentiates through the solve."""
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand_as(L)
    return torch.linalg.solve_triangular(L, eye, upper=False, unitriangular=True)


def unit_lower_inverse_by_squaring(L: torch.Tensor) -> torch.Tensor:
    """(I + tril(L, -1))^{-1} for L: (..., C, C) from products alone, autograd through them: with N = tril(L, -1)
    nilpotent (N^C = 0), (I + N)^{-1} = (I - N)(I + N^2)(I + N^4)...(I + N^(2^k)) up to 2^(k+1) >= C, that is
    2 (log2(C) - 1) products of C x C matrices (6 at C = 16). For compiled graphs: no LAPACK call, which inductor's C++
    wrapper has no direct binding for, and products the compiler can fuse. Equals ``unit_lower_inverse_reference``
    up to rounding (fp32 error 4e-8 against the solve's 9e-8 for 16 x 16 unit keys)."""
    n = L.shape[-1]
    N = torch.tril(L, -1)
    eye = torch.eye(n, dtype=L.dtype, device=L.device)
    X, P, reach = eye - N, N, 2  # X = (I + N)^{-1} up to the terms of N^reach and beyond
    while reach < n:
        P = P @ P
        X = X @ (eye + P)
        reach *= 2
    return X


# Below this size a unit lower triangular block is inverted by row substitution (batched over every block).
_SUBSTITUTION_SIZE = 8


def _substitution_inverse(L: torch.Tensor) -> torch.Tensor:
    """(I + tril(L, -1))^{-1} for L: (M, n, n), n small: row r of X is e_r - L[r, :r] X[:r], one batched
    (1 x r) @ (r x r) product per row."""
    n = L.shape[-1]
    X = torch.zeros_like(L)
    X.diagonal(dim1=-2, dim2=-1).fill_(1.0)
    for r in range(1, n):
        X[:, r : r + 1, :r] = -(L[:, r : r + 1, :r] @ X[:, :r, :r])
    return X


def unit_lower_inverse_blocked(L: torch.Tensor) -> torch.Tensor:
    """(I + tril(L, -1))^{-1} for L: (..., C, C) by recursive 2 x 2 blocking, no autograd.

    With I + L = [[T11, 0], [L21, T22]], the inverse is [[X11, 0], [-X22 L21 X11, X22]]; both diagonal halves
    recurse together as one batch of twice the size, down to blocks of ``_SUBSTITUTION_SIZE`` solved by row
    substitution. A batched LAPACK solve handles one small matrix per call (about 16 us for 64 x 64 here); these are
    a few batched products over all matrices at once: for 512 blocks of 64 (the chunked delta rule at T = 8192, four
    heads) 4.5 ms against the solve's 8 ms at one thread, and 3.7 ms at two threads, where the solve took 25 ms, on
    an AMD EPYC machine (MKL's generic path; on an Intel Xeon MKL's solve won, see ``_uses_blocked_inverse``).
    Equals ``unit_lower_inverse_reference`` up to rounding (same substitution, reordered).
    """
    lead, n = L.shape[:-2], L.shape[-1]
    L = L.reshape(-1, n, n)
    if _base_block_size(n) <= _SUBSTITUTION_SIZE < n:
        return _unit_lower_inverse_in_place_levels(L.contiguous()).reshape(*lead, n, n)
    if n <= _SUBSTITUTION_SIZE:
        return _substitution_inverse(L).reshape(*lead, n, n)
    h = n // 2
    if n % 2 == 0:
        X11, X22 = unit_lower_inverse_blocked(torch.cat([L[:, :h, :h], L[:, h:, h:]])).chunk(2)
    else:
        X11, X22 = unit_lower_inverse_blocked(L[:, :h, :h]), unit_lower_inverse_blocked(L[:, h:, h:])
    X = torch.zeros_like(L)
    X[:, :h, :h] = X11
    X[:, h:, h:] = X22
    # Into a fresh product, then copied: a matmul writing into the strided block runs one matrix at a time.
    X[:, h:, :h] = -((X22 @ L[:, h:, :h]) @ X11)
    return X.reshape(*lead, n, n)


def _base_block_size(n: int) -> int:
    """n halved while even and above ``_SUBSTITUTION_SIZE``: the diagonal blocks the levels start from."""
    while n > _SUBSTITUTION_SIZE and n % 2 == 0:
        n //= 2
    return n


def _level_blocks(X: torch.Tensor, s: int, offset: int) -> torch.Tensor:
    """Every other s x s block along the diagonal of each (n, n) matrix of a contiguous X: (M, n / 2s, s, s) view,
    starting ``offset`` elements into each matrix (0: the even diagonal blocks, s (n + 1): the odd ones, s n: the
    blocks below the even ones)."""
    M, n, _ = X.shape
    return X.as_strided((M, n // (2 * s), s, s), (n * n, 2 * s * (n + 1), n, 1), X.storage_offset() + offset)


def _unit_lower_inverse_in_place_levels(L: torch.Tensor) -> torch.Tensor:
    """``unit_lower_inverse_blocked`` for L: (M, n, n) contiguous, n = b 2^j with b <= ``_SUBSTITUTION_SIZE``: the
    same 2 x 2 block formula, level by level from the b x b diagonal blocks up, every level's blocks read and
    written as strided views of one output (no per-level concatenation and reassembly of the matrices)."""
    M, n, _ = L.shape
    b = _base_block_size(n)
    X = torch.zeros_like(L)
    diagonal = (M, n // b, b, b), (n * n, b * (n + 1), n, 1)
    X_diag = X.as_strided(*diagonal, X.storage_offset())
    X_diag.copy_(_substitution_inverse(L.as_strided(*diagonal, L.storage_offset()).reshape(-1, b, b)).view_as(X_diag))
    s = b
    while s < n:
        X11, X22 = _level_blocks(X, s, 0), _level_blocks(X, s, s * (n + 1))
        _level_blocks(X, s, s * n).copy_(((X22 @ _level_blocks(L, s, s * n)) @ X11).neg_())
        s *= 2
    return X


def _uses_blocked_inverse(L: torch.Tensor) -> bool:
    """Many matrices of 32 rows or more: the blocked form wins; a few small ones: the per-matrix solve. On a CPU
    whose MKL takes its own fast path (``ops.cpu.mkl_generic_path`` false, e.g. an Intel Xeon) the solve always: there
    it ran 2.6x faster than the blocked form on 32 matrices of 64 at one thread (the chunked delta rule at T = 8192,
    four heads: forward 1.09-1.13x, forward and backward 1.04-1.06x at 1 and 2 threads, either wait policy)."""
    n = L.shape[-1]
    if L.device.type == "cpu" and not mkl_generic_path():
        return False
    return n >= 32 and L.numel() >= 32 * n * n


def unit_lower_inverse_values(L: torch.Tensor) -> torch.Tensor:
    """The values of ``unit_lower_inverse`` without autograd: the blocked form for many blocks, else the solve."""
    if _uses_blocked_inverse(L):
        return unit_lower_inverse_blocked(L)
    with _one_thread(L.device):
        return unit_lower_inverse_reference(L)


class _UnitLowerInverse(torch.autograd.Function):
    """X = (I + tril(L, -1))^{-1}; backward dL = tril(-X^T dX X^T, -1) (differentiable: double backward works)."""

    @staticmethod
    def forward(ctx, L):
        X = unit_lower_inverse_values(L)
        ctx.save_for_backward(X)
        return X

    @staticmethod
    def backward(ctx, grad):
        (X,) = ctx.saved_tensors
        return ((X.mT @ grad) @ X.mT).tril_(-1).neg_()


def unit_lower_inverse(L: torch.Tensor) -> torch.Tensor:
    """(I + tril(L, -1))^{-1} for L: (..., C, C) (only the strict lower part is read) with an analytic backward
    (two matmuls instead of a second triangular solve). Equals ``unit_lower_inverse_reference``."""
    return _UnitLowerInverse.apply(L)


def chunk_scan_reference(A: torch.Tensor, Bc: torch.Tensor, R0: torch.Tensor) -> torch.Tensor:
    """R_{n+1} = A_n R_n + Bc_n by autograd-tracked matmuls. A: (N, M, Dk, Dk), Bc: (N, M, Dk, Dv), R0: (M, Dk, Dv).

    Returns every state, (N + 1, M, Dk, Dv): R_0 (the input) to R_N.
    """
    states = [R0]
    for A_n, B_n in zip(A.unbind(0), Bc.unbind(0)):
        states.append(torch.baddbmm(B_n, A_n, states[-1]))
    return torch.stack(states)


def chunk_scan_values(A: torch.Tensor, Bc: torch.Tensor, R0: torch.Tensor) -> torch.Tensor:
    """``chunk_scan_reference``'s states without autograd, into one preallocated (N + 1, M, Dk, Dv) tensor."""
    N = A.shape[0]
    out = R0.new_empty(N + 1, *R0.shape)
    out[0] = R0
    # the views made once, not per step: each index is a Python call, and the loop is the op's sequential part
    As, Bs, states = A.unbind(0), Bc.unbind(0), out.unbind(0)
    with _one_thread(R0.device):
        for n in range(N):
            torch.baddbmm(Bs[n], As[n], states[n], out=states[n + 1])
    return out


def chunk_scan_state_grads(A: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The scan's backward recursion without autograd: dR_N = G_N, dR_n = G_n + A_n^T dR_{n+1}, where G: (N + 1,
    M, Dk, Dv) is the gradient of every state directly. Returns every dR_n."""
    N = A.shape[0]
    dR = torch.empty_like(grad)
    dR[N] = grad[N]
    As, G, dRs = A.mT.unbind(0), grad.unbind(0), dR.unbind(0)
    with _one_thread(grad.device):
        for n in range(N - 1, -1, -1):
            torch.baddbmm(G[n], As[n], dRs[n + 1], out=dRs[n])
    return dR


class _ChunkScan(torch.autograd.Function):
    """``chunk_scan_reference`` with preallocated outputs and a hand-written backward:
    dR_n = G_n + A_n^T dR_{n+1} (from dR_N = G_N), dBc_n = dR_{n+1}, dA_n = dR_{n+1} R_n^T."""

    @staticmethod
    def forward(ctx, A, Bc, R0):
        out = chunk_scan_values(A, Bc, R0)
        ctx.save_for_backward(A, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        A, out = ctx.saved_tensors
        N = A.shape[0]
        if torch.is_grad_enabled():  # create_graph: the same recursion on tracked ops, for double backward
            grads = [grad[N]]
            with _one_thread(out.device):
                for n in range(N - 1, -1, -1):
                    grads.append(torch.baddbmm(grad[n], A[n].mT, grads[-1]))
            dR = torch.stack(grads[::-1])
        else:
            dR = chunk_scan_state_grads(A, grad)
        dA = dR[1:] @ out[:-1].mT
        return dA, dR[1:], dR[0]


def chunk_scan(A: torch.Tensor, Bc: torch.Tensor, R0: torch.Tensor) -> torch.Tensor:
    """Affine recurrence over chunks R_{n+1} = A_n R_n + Bc_n; shapes as in ``chunk_scan_reference``, which it
    equals (values and gradients)."""
    return _ChunkScan.apply(A, Bc, R0)


def _intra_chunk_masked(q, k, eta, g, g_prev, read):
    """L (strict lower part used) and the read matrix P with decays exp(g_rows_t - g_i) formed on the causal
    mask: exact for any decay range. q, k: (..., C, Dk), eta, g, g_prev: (..., C)."""
    C = k.shape[-2]
    decay_strict = decay_matrix(g, g_prev, C, strict=True, like=k)
    L = (_rows(k, None, eta) @ k.mT) * decay_strict
    decay_read = decay_matrix(g, g, C, strict=False, like=k) if read == "after" else decay_strict
    return L, (q @ k.mT) * decay_read


# Bytes of one (G, B*H, C, D) intermediate of a chunk group on CPU (see chunks_per_group); None: one core's L2 cache
# (``ops.cpu.l2_cache_bytes``), or DEFAULT_GROUP_BYTES where the cache size cannot be read.
GROUP_BYTES: int | None = None
DEFAULT_GROUP_BYTES = 1024 * 1024


def group_bytes() -> int:
    """The chunk groups' budget per intermediate: ``GROUP_BYTES`` if set, else one core's L2 cache."""
    if GROUP_BYTES is not None:
        return GROUP_BYTES
    return l2_cache_bytes() or DEFAULT_GROUP_BYTES


def chunks_per_group(N: int, BH: int, C: int, D: int, device: torch.device, dtype: torch.dtype) -> int:
    """How many chunks ``delta_rule_chunk`` takes through its batched steps at a time (all N, or fewer on CPU).

    On CPU the intermediates of a whole long sequence (eight (N, B*H, C, D) tensors and more) spill from cache to
    memory between one product and the next; a group of chunks whose tensors stay near ``group_bytes()`` each (one
    core's L2 cache) is read back from cache instead: a batched (64 x 64) product ran at 98 GFLOP/s over 32 matrices
    against 71 over 512 at one thread on an AMD EPYC (the forward at T = 8192, four heads of 64: 59 -> 44 ms at one
    thread, docs/results/bench_ops.md). The budget follows the cache: 512 KiB, 1 MiB and 2 MiB ran within noise of
    each other there (1 MiB of L2 a core), while on an Intel Xeon (2 MiB a core) 2 MiB ran the forward 1.16x faster
    than 512 KiB at one thread and 1.25x with two threads spinning, and inside the parts of a side-by-side run
    1.15x faster than 1 MiB (forward and backward: 1.08x, 1.16x, 1.03x). Not on other devices, which want the
    largest batches, nor while torch.compile traces the code, nor when idle threads sleep between ops
    (OMP_WAIT_POLICY=PASSIVE with more than one thread): there each op of a group pays a wake-up, and fewer, larger
    ops win (at two threads the forward took about 35 ms whole, 46 ms in groups of 16).
    """
    if device.type != "cpu" or torch.compiler.is_compiling():
        return N
    if torch.get_num_threads() > 1 and threads_sleep_between_ops():
        return N
    per_chunk = BH * C * max(C, D) * torch.finfo(dtype).bits // 8
    return max(1, min(N, group_bytes() // per_chunk))


def delta_rule_chunk(q, k, v, eta, alpha, initial_state, chunk_size, read, dtype):
    """Chunked delta rule. q, k: (B, T, H, Dk), v: (B, T, H, Dv), eta, alpha: (B, T, H), state (B, H, Dv, Dk).

    Returns o: (B, T, H, Dv) and S_T: (B, H, Dv, Dk), both in ``dtype``. Internally (N, B*H, C, D) chunks and the
    transposed state R = S^T: (B*H, Dk, Dv), taken through ``_chunk_group`` a group of chunks at a time (the
    state carried from one group to the next).
    """
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    if initial_state is None:
        R = q.new_zeros(B * H, Dk, Dv, dtype=dtype)
    else:
        R = initial_state.to(dtype).reshape(B * H, Dv, Dk).mT.contiguous()
    if T == 0:
        return v.new_zeros(B, 0, H, Dv, dtype=dtype), R.mT.reshape(B, H, Dv, Dk).contiguous()
    C = min(chunk_size, T)
    N = -(-T // C)
    G = chunks_per_group(N, B * H, C, max(Dk, Dv), q.device, dtype)
    # q, k, v split into groups of G C tokens, each then chunked (N_g, BH, C, D): the layout change of their
    # gradients happens group by group, and the groups' gradients concatenate along the sequence. Split, not
    # sliced: one autograd node concatenates them (a slice's backward writes each into a zero tensor of the whole
    # input's size).
    qkv = [[to_chunks(part, C, chunk_major=True) for part in x.to(dtype).split(G * C, dim=1)] for x in (q, k, v)]
    # (N, BH, C), contiguous so that the row scalings built from it write contiguous results.
    eta = to_chunks(eta.to(dtype), C, chunk_major=True).contiguous()
    g, g_prev = chunk_log_decay(alpha, C, dtype, chunk_major=True)  # (N, BH, C) each, or None
    factored = factored_decay_ok(g, dtype)
    groups = [*qkv, *(x.split(G) if x is not None else [None] * len(qkv[0]) for x in (eta, g, g_prev))]
    outputs = []
    hand_grad = factored and not torch.compiler.is_compiling()
    if hand_grad:  # builds on this module's primitives, hence imported here
        from .delta_rule_chunk_grad import chunk_group_hand_grad
    for q_g, k_g, v_g, eta_g, g_g, g_prev_g in zip(*groups):
        if hand_grad:
            o, R = chunk_group_hand_grad(q_g, k_g, v_g, eta_g, g_g, g_prev_g, R, read)
        else:
            o, R = _chunk_group(q_g, k_g, v_g, eta_g, g_g, g_prev_g, R, read, factored)
        # (n, BH, C, Dv) -> (B, n, C, H, Dv): token-major, so that the groups concatenate along the sequence
        outputs.append(o.view(o.shape[0], B, H, C, Dv).permute(1, 0, 3, 2, 4))
    o = outputs[0].contiguous() if len(outputs) == 1 else torch.cat(outputs, dim=1)
    o = o.reshape(B, N * C, H, Dv)[:, :T].contiguous()
    return o, R.mT.reshape(B, H, Dv, Dk).contiguous()


def _chunk_group(q, k, v, eta, g, g_prev, R, read, factored):
    """Outputs (n, BH, C, Dv) of n consecutive chunks (n, BH, C, D) entered with state R: (BH, Dk, Dv), and the
    state after them. g, g_prev: in-chunk log decays (n, BH, C) or None; ``factored``: whether every chunk's decay
    range allows the factored decays (``factored_decay_ok``). Differentiable by autograd."""
    parts = chunk_group_parts(q, k, v, eta, g, g_prev, R, read, factored)
    return parts["o"], parts["R_all"][q.shape[0]]


def chunk_group_parts(q, k, v, eta, g, g_prev, R, read, factored) -> dict:
    """``_chunk_group``'s outputs and intermediates: o, R_all (the n + 1 states, entering each chunk, then after the
    last), k_write, q_inter, k_read (None without factored decays), k_tail, P, T_inv, W1, W2, A, q_state."""
    n, BH, C, Dv = v.shape
    k_write = _rows(k, g_prev, eta)  # eta_t gamma_{t-1} k_t
    q_inter = _rows(q, g if read == "after" else g_prev)  # gamma_t q_t or gamma_{t-1} q_t
    k_read = None
    if factored:
        # gamma_rows_t / gamma_i = exp(g_rows_t) exp(-g_i): the decays ride on the matmul operands.
        # Columns k_i / gamma_i: (n, BH, C, Dk), read transposed.
        k_read = _rows(k, None if g is None else -g)
        L = k_write @ k_read.mT
        P = (q_inter @ k_read.mT).tril_(0 if read == "after" else -1)
    else:
        L, P = _intra_chunk_masked(q.contiguous(), k.contiguous(), eta, g, g_prev, read)

    # UT transform once per chunk, all chunks at once; only the strictly lower triangle of L is read.
    T_inv = unit_lower_inverse(L)  # (n, BH, C, C)
    ev = _rows(v, None, eta)
    W1 = T_inv @ ev  # (n, BH, C, Dv)
    W2 = T_inv @ k_write  # (n, BH, C, Dk)

    # K_tail, rows (gamma_C / gamma_i) k_i: (n, BH, C, Dk), read transposed, and the chunk maps R -> A R + Bc.
    k_tail = k if g is None else _rows(k, g[..., -1:] - g)
    A = (k_tail.mT @ W2).neg_()
    A.diagonal(dim1=-2, dim2=-1).add_(1.0 if g is None else torch.exp(g[..., -1:]))  # + gamma_C I
    R_all = chunk_scan(A, k_tail.mT @ W1, R)  # (n + 1, BH, Dk, Dv): S^T entering each chunk, then after the last

    # o = q_inter R_0 + P U with U = W1 - W2 R_0, regrouped as (q_inter - P W2) R_0 + P W1: U is never formed
    # and only the last product waits for the recurrence.
    flat = [x.flatten(0, 1) for x in (W1, W2, P, q_inter)]
    q_state = torch.baddbmm(flat[3], flat[2], flat[1], alpha=-1.0)  # (n*BH, C, Dk)
    o = torch.baddbmm(flat[2] @ flat[0], q_state, R_all[:n].flatten(0, 1))  # (n*BH, C, Dv)
    return dict(o=o.view(n, BH, C, Dv), R_all=R_all, k_write=k_write, q_inter=q_inter, k_read=k_read, ev=ev,
                k_tail=k_tail, P=P, T_inv=T_inv, W1=W1, W2=W2, A=A, q_state=q_state.view(n, BH, C, -1))
