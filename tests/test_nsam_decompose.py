"""Decompositions that run: a model or optimizer re-run from its levels' update rules alone reproduces the original
(fp64, 1e-10). Each compares with the original module, op or torch optimizer, never with itself."""

import pytest
import torch

from nested_learning.memory import DeltaNetLayer, LinearAttentionLayer
from nested_learning.models.hope import HOPE
from nested_learning.models.hope_attention import HOPEAttention
from nested_learning.models.transformer import TransformerPP
from nested_learning.nsam.decompose.hope import hope_from_levels
from nested_learning.nsam.decompose.optimizers import (
    adam_from_levels,
    eq101_minimiser,
    m3_from_levels,
    sgd_momentum_from_levels,
)
from nested_learning.nsam.decompose.sequence import (
    deltanet_from_levels,
    linear_attention_from_levels,
    memory_level,
)
from nested_learning.nsam.decompose.transformer import transformer_from_levels
from nested_learning.ops import delta_rule, linear_attention
from nested_learning.optimizers import M3

D = torch.float64
TOL = 1e-10


def _err(a, b) -> float:
    return (a - b).abs().max().item()


def _qkv(B=2, T=11, H=2, d=4):
    q, k, v = (torch.randn(B, T, H, d, dtype=D) for _ in range(3))
    return q, torch.nn.functional.normalize(k, dim=-1), v


@pytest.mark.parametrize("decay", [False, True])
def test_linear_attention_is_gd_with_rate_one_on_the_dot_objective(decay):
    # Eq 14-18 against the op's chunked form (chunk 4, T = 11 not a multiple of it)
    q, k, v = _qkv()
    alpha = torch.rand(2, 11, 2, dtype=D) * 0.5 + 0.5 if decay else None
    o_op, S_op = linear_attention(q, k, v, alpha, chunk_size=4)
    o, S = memory_level(q, k, v, "dot", retention=alpha)
    assert _err(o, o_op) < TOL and _err(S, S_op) < TOL


def test_deltanet_is_gd_on_the_l2_objective():
    # Eq 65 against the op's chunked form; the dot-product rule with the same rates is not DeltaNet
    q, k, v = _qkv()
    beta = torch.rand(2, 11, 2, dtype=D)
    o_op, S_op = delta_rule(q, k, v, beta, None, chunk_size=4)
    o, S = memory_level(q, k, v, "l2", lr=beta)
    assert _err(o, o_op) < TOL and _err(S, S_op) < TOL
    assert _err(memory_level(q, k, v, "dot", lr=beta)[0], o_op) > 1e-2


@pytest.mark.parametrize(
    "layer",
    [
        lambda: LinearAttentionLayer(16, 2, chunk_size=4),
        lambda: LinearAttentionLayer(16, 2, chunk_size=4, conv_size=4, feature_map="l2", decay=True),
        lambda: DeltaNetLayer(16, 2, chunk_size=4),
    ],
    ids=["linear_attention", "linear_attention_decay_conv", "deltanet"],
)
def test_memory_layers_equal_projections_plus_memory_level(layer):
    layer = layer().double()
    x = torch.randn(2, 9, 16, dtype=D)
    run = deltanet_from_levels if isinstance(layer, DeltaNetLayer) else linear_attention_from_levels
    with torch.no_grad():
        assert _err(run(layer, x), layer(x)[0]) < TOL


def test_transformer_is_a_kv_memory_over_frozen_weights():
    model = TransformerPP(vocab_size=50, dim=16, n_layers=2, n_heads=2, max_seq_len=64).double()
    ids = torch.randint(0, 50, (2, 11))
    with torch.no_grad():
        assert _err(transformer_from_levels(model, ids), model(ids).logits) < TOL


def _regression(matrix_only: bool = False):
    torch.manual_seed(1)
    X, Y = torch.randn(32, 5, dtype=D), torch.randn(32, 3, dtype=D)
    W = torch.randn(3, 5, dtype=D, requires_grad=True)
    b = torch.randn(3, dtype=D, requires_grad=True)
    params = [W] if matrix_only else [W, b]
    return params, lambda: ((torch.tanh(X @ W.T + (0 if matrix_only else b)) - Y) ** 2).mean()


def _torch_run(make, steps: int, matrix_only: bool = False):
    params, closure = _regression(matrix_only)
    opt, out = make(params), []
    for _ in range(steps):
        opt.zero_grad()
        closure().backward()
        opt.step()
        out.append([p.detach().clone() for p in params])
    return out


def _trajectory_err(a, b) -> float:
    return max(_err(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_is_two_levels(nesterov):
    kw = dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=nesterov)
    ref = _torch_run(lambda ps: torch.optim.SGD(ps, **kw), 30)
    params, closure = _regression()
    got = sgd_momentum_from_levels(params, closure, 30, **kw)
    assert _trajectory_err(got, ref) < TOL
    assert _err(ref[-1][0], ref[0][0]) > 0.1  # the weights did move


def test_adam_is_two_moment_memories_and_the_eq101_argmin():
    kw = dict(lr=0.01, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.01)
    ref = _torch_run(lambda ps: torch.optim.Adam(ps, **kw), 30)
    params, closure = _regression()
    assert _trajectory_err(adam_from_levels(params, closure, 30, **kw), ref) < TOL


@pytest.mark.parametrize("betas", [(0.9, 0.9), (0.9, 0.999)], ids=["one_time_scale", "two_time_scales"])
def test_eq101_minimised_numerically_over_the_stored_gradients_gives_adams_step(betas):
    params, closure = _regression()
    W, lr, grads = params[0], 0.01, []
    opt = torch.optim.Adam([W], lr=lr, betas=betas)
    for _ in range(6):
        opt.zero_grad()
        closure().backward()
        grads.append(W.grad.clone())
        before = W.detach().clone()
        opt.step()
        step = (before - W.detach()) / lr
        assert _err(eq101_minimiser(grads, betas, 1e-8), step) < 1e-9 * (1 + step.abs().max().item())


def test_m3_is_fast_and_slow_momentum_levels():
    kw = dict(lr=1e-3, betas=(0.9, 0.99, 0.8), alpha=0.5, frequency=4)
    ref = _torch_run(lambda ps: M3([{"params": ps, "orthogonalize": True}], **kw), 13, matrix_only=True)
    params, closure = _regression(matrix_only=True)
    assert _trajectory_err(m3_from_levels(params, closure, 13, **kw), ref) < TOL
    # the slow level matters: without it (alpha = 0) the trajectory differs after its first update (step 4)
    params, closure = _regression(matrix_only=True)
    assert _trajectory_err(m3_from_levels(params, closure, 13, **{**kw, "alpha": 0.0}), ref) > 1e-6


HOPE_SIZES = dict(vocab_size=40, dim=16, n_layers=2, n_heads=2, chunk_sizes=(2, 4, 8), titans_chunk_size=2,
                  cms_expansion=2)


@pytest.mark.parametrize(
    "cls, extra",
    [
        (HOPE, {}),
        (HOPE, dict(cms_inner_lr=0.9, cms_grad_clip=1e-3)),  # the trust region active at every step
        (HOPE, dict(cms_grad_clip=None, cms_variant="nested")),
        (HOPEAttention, dict(max_seq_len=64)),
    ],
    ids=["hope", "hope_clipped", "hope_nested", "hope_attention"],
)
def test_hope_is_its_mixer_level_and_cms_levels_at_their_frequencies(cls, extra):
    model = cls(**HOPE_SIZES, **extra).double()
    with torch.no_grad():  # a learned restart fraction of its own in every layer (nested variant)
        for cms in model.cms_layers():
            if cms.nested_logit is not None:
                cms.nested_logit.normal_()
    ids = torch.randint(0, 40, (2, 21))  # 21: the last segment is partial
    with torch.no_grad():
        ref = model(ids).logits
        model.set_test_time_updates(False)
        frozen = model(ids).logits
        model.set_test_time_updates(True)
    assert _err(hope_from_levels(model, ids), ref) < TOL
    assert _err(frozen, ref) > 1e-4  # the CMS levels' in-context steps change the output


def test_hopeified_llama_is_its_attention_level_and_swiglu_cms_levels():
    transformers = pytest.importorskip("transformers")
    from nested_learning.models import hopeify

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    llama = transformers.LlamaForCausalLM(cfg).eval().double()
    # layer 0 keeps its plain MLP; layer 1's becomes SwiGLU levels at C = 2, 4 ("added": faster levels in front)
    model = hopeify(llama, layers=(1,), chunk_sizes=(2, 4), scheme="added", inner_lr=0.5, window=8).double()
    ids = torch.randint(0, 40, (2, 13))
    with torch.no_grad():
        ref = model(ids).logits
        model.set_test_time_updates(False)
        frozen = model(ids).logits
        model.set_test_time_updates(True)
    assert _err(hope_from_levels(model, ids), ref) < TOL
    assert _err(frozen, ref) > 1e-6
