"""NeuralMemory's chunk-parallel (dual) form against a plain loop over tokens of its rule."""

import pytest
import torch
import torch.nn.functional as F

from nested_learning.memory import FastWeightMemory, LinearMemory, MLPMemory, NeuralMemory


def _mlp(W, x):
    """Eq 89 written out: x + W1 gelu(W2 x) for one memory; W = [W2, W1]."""
    return x + W[1] @ F.gelu(W[0] @ x)


def _linear(W, x):
    return W[0] @ x


def reference_reads(layer: NeuralMemory, x: torch.Tensor, fn):
    # grad_at="call_start": every token's gradient at the weights of t = 0
    """Token loop: gradients at the chunk-start weights (each from its own autograd call), then
    S = eta S - theta g, M = (1 - alpha) M + alpha M_init + S (M_init = 0 for retention="zero"), y_t = M_t(q_t).
    Returns reads (N, T, dh) and final (M, S)."""
    q, k, v, theta, log_eta, log_keep, _ = layer.project(x, None)
    eta, keep = log_eta.exp(), log_keep.exp()
    N, T, _ = q.shape
    M = [[w[n].detach().clone() for w in layer.memory.init_weights(x.shape[0])] for n in range(N)]
    M_init = [[w.clone() if layer.retention == "initial" else torch.zeros_like(w) for w in Mn] for Mn in M]
    S = [[torch.zeros_like(w) for w in M[n]] for n in range(N)]
    reads = torch.zeros_like(q)
    for n in range(N):
        for t in range(T):
            if t % layer.chunk_size == 0 if layer.grad_at == "chunk_start" else t == 0:
                M_chunk = [w.clone().requires_grad_() for w in M[n]]
            loss = (fn(M_chunk, k[n, t]) - v[n, t]).pow(2).sum()
            grads = torch.autograd.grad(loss, M_chunk)
            if layer.grad_clip is not None:  # the token's whole gradient, scaled to norm <= grad_clip
                norm = torch.sqrt(sum(g.square().sum() for g in grads))
                grads = [g * min(1.0, layer.grad_clip / norm.item()) for g in grads]
            S[n] = [eta[n, t] * s - theta[n, t] * g for s, g in zip(S[n], grads)]
            # (1 - alpha) M + alpha M_init, written as the decay of M - M_init
            M[n] = [m0 + keep[n, t] * (m - m0) + s for m, m0, s in zip(M[n], M_init[n], S[n])]
            reads[n, t] = fn(M[n], q[n, t])
    return reads, M, S


def _assert_reads_equal_the_token_loop(layer, fn, momentum: bool):
    """The layer's reads and final weights (and momenta) on 11 random tokens equal ``reference_reads`` (fp64);
    returns the tokens and the reads."""
    x = torch.randn(2, 11, 8, dtype=torch.float64)
    with torch.no_grad():
        reads, state = layer.read(x)
    ref, M, S = reference_reads(layer, x, fn)
    torch.testing.assert_close(reads, ref, rtol=0, atol=1e-10)
    for n in range(reads.shape[0]):
        for i in range(len(M[n])):
            torch.testing.assert_close(state.weights[i][n], M[n][i], rtol=0, atol=1e-10)
            if momentum:
                torch.testing.assert_close(state.momentum[i][n], S[n][i], rtol=0, atol=1e-10)
    return x, reads


@pytest.mark.parametrize("memory,fn", [("mlp", _mlp), ("linear", _linear)])
@pytest.mark.parametrize("chunk_size", [1, 3, 5])
@pytest.mark.parametrize("grad_clip", [None, 0.5])
@pytest.mark.parametrize("retention", ["initial", "zero"])
def test_chunk_parallel_equals_token_loop(memory, fn, chunk_size, grad_clip, retention):
    torch.manual_seed(1)
    # theta up to 1 with unclipped steps overshoots on a memory held near its initial scale (reads ~4e4 at
    # chunk_size 1, where fp64 rounding alone is 1e-10): the initial-retention runs take theta up to 0.5
    max_lr = 1.0 if retention == "zero" else 0.5
    layer = NeuralMemory(8, n_heads=2, chunk_size=chunk_size, memory=memory, max_lr=max_lr, grad_clip=grad_clip,
                         retention=retention)
    layer = layer.double()
    if memory == "linear":
        with torch.no_grad():
            layer.memory.initial[0].normal_(0, 0.3)
    with torch.no_grad():  # large, varied gates so momentum and decay matter
        layer.to_gates.weight.normal_(0, 1.0)
        layer.to_gates.bias.zero_()
    _assert_reads_equal_the_token_loop(layer, fn, momentum=True)


def test_memory_architectures_match_eq89():
    torch.manual_seed(0)
    mem = MLPMemory(4, 6, n_heads=3).double()
    W = mem.init_weights(2)
    assert [w.shape for w in W] == [(6, 6, 4), (6, 4, 6)]
    x = torch.randn(6, 5, 4, dtype=torch.float64)
    y = mem(W, x)
    for n in range(6):
        for t in range(5):
            torch.testing.assert_close(y[n, t], _mlp([W[0][n], W[1][n]], x[n, t]), rtol=0, atol=1e-12)
    # batch-major expansion: batch b, head h uses the initial values of head h
    torch.testing.assert_close(W[0][4], mem.initial[0][1])
    lin = LinearMemory(4, 3, n_heads=1, init="identity")
    torch.testing.assert_close(
        lin([torch.eye(3, 4).expand(2, 3, 4)], torch.ones(2, 1, 4)), torch.ones(2, 1, 3)
    )


class _GenericMLP(MLPMemory):
    """MLPMemory without its closed-form gradient: exercises the generic autograd path of the base class."""

    grad_factors = FastWeightMemory.grad_factors


@pytest.mark.parametrize(
    "make", [lambda: MLPMemory(4, 5), lambda: _GenericMLP(4, 5), lambda: LinearMemory(4, 3)]
)
def test_grad_factors_are_per_token_gradients(make):
    """deltas[i][t] outer inputs[i][t] equals the autograd gradient of the token-t loss alone."""
    torch.manual_seed(0)
    mem = make().double()
    W = mem.init_weights(1)
    d_out = W[-1].shape[-2]
    x, v = torch.randn(1, 3, 4, dtype=torch.float64), torch.randn(1, 3, d_out, dtype=torch.float64)
    deltas, inputs = mem.grad_factors(W, x, lambda out: 2 * (out - v))
    for t in range(3):
        leaves = [w.detach().clone().requires_grad_() for w in W]
        loss = (mem(leaves, x[:, t : t + 1]) - v[:, t : t + 1]).pow(2).sum()
        grads = torch.autograd.grad(loss, leaves)
        for i in range(len(W)):
            torch.testing.assert_close(
                grads[i][0], torch.outer(deltas[i][0, t], inputs[i][0, t]), rtol=0, atol=1e-12
            )


def test_generic_and_closed_form_grad_factors_agree_to_second_order():
    """Both paths give the same slow-weight gradients through a NeuralMemory (second-order terms included)."""
    torch.manual_seed(0)
    x = torch.randn(1, 7, 8, dtype=torch.float64)
    grads = []
    for cls in (MLPMemory, _GenericMLP):
        torch.manual_seed(1)
        layer = NeuralMemory(8, n_heads=2, chunk_size=3, memory=cls(4, 6, n_heads=2)).double()
        y, _ = layer(x)
        grads.append(torch.autograd.grad(y.pow(2).sum(), [layer.memory.initial[0], layer.to_qkv.weight]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_zero_learning_rate_only_decays_memory():
    """theta = 0: no writes, so M_T = prod_t (1 - alpha_t) M_0 (retention="zero") and the surprise stays zero."""
    layer = NeuralMemory(8, n_heads=2, chunk_size=3, max_lr=0.0, retention="zero").double()
    x = torch.randn(1, 7, 8, dtype=torch.float64)
    _, state = layer(x)
    *_, log_keep, _ = layer.project(x, None)
    retained = log_keep.sum(-1).exp()[:, None, None]
    for w, s, w0 in zip(state.weights, state.momentum, layer.memory.init_weights(1)):
        torch.testing.assert_close(w, retained * w0, rtol=0, atol=1e-14)
        assert torch.all(s == 0)


def test_gradient_clipping_keeps_an_mlp_memory_bounded_where_plain_steps_diverge():
    """Large values and full-size steps: the MLP memory's curvature grows with its weights, so unclipped chunk
    steps blow up; clipped ones stay bounded, and a clip above every gradient norm changes nothing."""
    torch.manual_seed(0)
    x = torch.randn(1, 512, 16)
    norms = {}
    for clip in (None, 1.0):
        layer = NeuralMemory(16, n_heads=2, chunk_size=64, memory="mlp", max_lr=1.0, grad_clip=clip)
        with torch.no_grad():
            layer.to_qkv.weight.mul_(20.0)  # values far from the keys' scale
            layer.to_gates.bias.fill_(4.0)  # theta ~ 1, strong momentum, little forgetting
            _, state = layer.read(x)
        norms[clip] = max(w.abs().max().item() for w in state.weights)
    assert not norms[None] < 1e6  # diverged (inf or NaN)
    assert norms[1.0] < 1e3
    layer = NeuralMemory(16, n_heads=2, chunk_size=8, memory="mlp")
    with torch.no_grad():
        plain = layer.read(x[:, :40])[0]
        layer.grad_clip = 1e9
        torch.testing.assert_close(layer.read(x[:, :40])[0], plain, rtol=0, atol=0)


def test_zero_learning_rate_keeps_the_initial_memory_under_initial_retention():
    """retention="initial": M - M_init decays, and a stream that starts at M_init without writes stays there."""
    layer = NeuralMemory(8, n_heads=2, chunk_size=3, max_lr=0.0).double()
    x = torch.randn(1, 7, 8, dtype=torch.float64)
    _, state = layer(x)
    for w, w0 in zip(state.weights, layer.memory.init_weights(1)):
        torch.testing.assert_close(w, w0.detach(), rtol=0, atol=1e-14)


@pytest.mark.parametrize("memory,fn", [("mlp", _mlp), ("linear", _linear)])
@pytest.mark.parametrize("grad_clip", [None, 0.5])
def test_call_start_gradients_equal_their_token_loop(memory, fn, grad_clip):
    """grad_at="call_start" (titans-pytorch's rule): every gradient at the weights the call started with."""
    torch.manual_seed(2)
    layer = NeuralMemory(8, n_heads=2, chunk_size=3, memory=memory, max_lr=0.5, grad_clip=grad_clip,
                         grad_at="call_start").double()
    with torch.no_grad():
        layer.to_gates.weight.normal_(0, 1.0)
        layer.to_gates.bias.zero_()
    x, reads = _assert_reads_equal_the_token_loop(layer, fn, momentum=True)
    exact = NeuralMemory(8, n_heads=2, chunk_size=3, memory=memory, max_lr=0.5, grad_clip=grad_clip).double()
    exact.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert (exact.read(x)[0] - reads).abs().max() > 1e-6  # a different rule past the first chunk
    with pytest.raises(ValueError):
        NeuralMemory(8, grad_at="token")
