"""The CMS chain read as one autograd node (``memory/cms_chain_read.py``) against autograd through the op-by-op
reference: values, the gradient of the input and of every level's weights, the sink of the inner gradients, second
derivatives, and a CMS language model with the fused read against the reference read."""

import pytest
import torch

from nested_learning.memory.cms import ContinuumMemorySystem
from nested_learning.memory.cms_chain_read import ChainRead, ChainSink, chain_read, chain_read_reference
from nested_learning.models import HOPE, HOPEAttention

FORMS = ["gelu", "swiglu"]


def cms(form, **kw):
    torch.manual_seed(0)
    return ContinuumMemorySystem(8, chunk_sizes=(2, 4, 8), expansion=3, level_form=form, **kw).double()


def per_sequence_weights(c, B):
    """Distinct weights per sequence (as after a few steps) and the expanded slow weights (as at the stream start)."""
    g = torch.Generator().manual_seed(1)
    expanded = c.initial_state(B, dtype=torch.float64).weights
    distinct = [(w + 0.1 * torch.randn(w.shape, generator=g, dtype=w.dtype)) for w in expanded]
    return {"expanded": expanded, "distinct": distinct}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", ["expanded", "distinct"])
def test_values_and_gradients_equal_autograd_through_the_reference(form, kind):
    c = cms(form)
    weights = [w.detach().clone().requires_grad_() if kind == "distinct" else w
               for w in per_sequence_weights(c, 3)[kind]]
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(3, 5, 8, dtype=torch.float64)
    leaves = [x] + ([w for w in weights] if kind == "distinct" else list(c.parameters()))

    y = chain_read(c.form, x, weights)
    y_ref = chain_read_reference(c.form, x, weights)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-13)
    got = torch.autograd.grad(y, leaves, gy, allow_unused=True)
    want = torch.autograd.grad(y_ref, leaves, gy, allow_unused=True)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("form", FORMS)
def test_the_sink_collects_each_levels_weight_gradient_and_passes_none_on(form):
    c = cms(form)
    weights = [w.detach().clone().requires_grad_() for w in per_sequence_weights(c, 2)["distinct"]]
    x = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 4, 8, dtype=torch.float64)
    sink = ChainSink()
    y = chain_read(c.form, x, weights, sink)
    want = torch.autograd.grad(chain_read_reference(c.form, x, weights), [x, *weights], gy)
    sink.collect = True
    (gx,) = torch.autograd.grad(y, [x], gy, retain_graph=True)
    sink.collect = False
    torch.testing.assert_close(gx, want[0], rtol=0, atol=1e-12)
    for a, b in zip(sink.take(), want[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match="no weight gradients"):
        sink.take()
    # collecting passes nothing on to the weights: their .grad stays empty
    sink.collect = True
    y.backward(gy, retain_graph=True)
    sink.collect = False
    assert all(w.grad is None for w in weights) and x.grad is not None
    y.backward(gy)  # without the flag the weights get their gradients
    for w, b in zip(weights, want[1:]):
        torch.testing.assert_close(w.grad, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("form", FORMS)
def test_second_derivatives_go_through_the_reference(form):
    c = cms(form)
    weights = [w.detach().clone().requires_grad_() for w in per_sequence_weights(c, 2)["distinct"]]
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)

    def grad_norm(read):
        (gx,) = torch.autograd.grad(read(c.form, x, weights).square().sum(), [x], create_graph=True)
        return torch.autograd.grad(gx.square().sum(), weights)

    for a, b in zip(grad_norm(chain_read), grad_norm(chain_read_reference)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


@pytest.mark.parametrize("form", FORMS)
def test_under_bf16_autocast_the_backward_runs_in_the_forwards_precision(form):
    """Under autocast the forward's products run in bf16; the backward's run in bf16 too (as autograd's would for
    the reference) and hand fp32 gradients to the fp32 input and weights. GELU levels then match the reference to
    the bit; SwiGLU's gate and up products are one product here, two there, so bf16 rounds them differently."""
    torch.manual_seed(0)
    c = ContinuumMemorySystem(16, chunk_sizes=(2, 4, 8), expansion=3, level_form=form)
    weights = [(w + 0.1 * torch.randn_like(w)).requires_grad_() for w in c.initial_state(3).weights]
    x = torch.randn(3, 5, 16, requires_grad=True)
    gy = torch.randn(3, 5, 16)
    sink = ChainSink()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = chain_read(c.form, x, weights, sink)
        y_ref = chain_read_reference(c.form, x, weights)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    got = torch.autograd.grad(y, [x, *weights], gy, retain_graph=True)
    want = torch.autograd.grad(y_ref, [x, *weights], gy)
    exact = form == "gelu"
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0 if exact else 0.02 * float(b.abs().max()))
    sink.collect = True  # the inner step's gradients too
    torch.autograd.grad(y, [x], gy)
    sink.collect = False
    for a, b in zip(sink.take(), got[1:]):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [HOPE, HOPEAttention])
def test_a_cms_language_model_trains_under_bf16_autocast_with_the_fused_read_as_with_the_reference(cls):
    torch.manual_seed(0)
    model = cls(vocab_size=50, dim=16, n_layers=2, n_heads=2, chunk_sizes=(4, 8), cms_inner_lr=0.5,
                titans_chunk_size=4)
    x, y = torch.randint(0, 50, (1, 23)), torch.randint(0, 50, (1, 23))

    def run(fused):  # the forward under autocast, the backward outside it (as torch.autocast's docs advise)
        model.fused_cms_read = fused
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, labels=y)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (a, ga), (b, gb) = run(True), run(False)
    assert torch.isfinite(a.loss)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=1e-6)
    assert ga.keys() == gb.keys()
    for n in ga:
        assert ga[n].dtype == torch.float32, n
        torch.testing.assert_close(ga[n], gb[n], rtol=0, atol=1e-6, msg=n)


def test_no_grad_read_and_the_independent_variant_fallback():
    c = cms("gelu")
    weights = per_sequence_weights(c, 2)["distinct"]
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    with torch.no_grad():
        y, cache = c.read(x, weights, fused=True)
        y_ref, _ = c.read(x, weights)
    assert isinstance(cache, ChainRead) and y.grad_fn is None
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-13)
    independent = cms("gelu", variant="independent")
    _, cache = independent.read(x, per_sequence_weights(independent, 2)["distinct"], fused=True)
    assert isinstance(cache, list)  # its gated sum is read op by op


def _run(model, x, y, fused):
    model.fused_cms_read = fused
    model.zero_grad(set_to_none=True)
    out = model(x, labels=y)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("cls", [HOPE, HOPEAttention])
@pytest.mark.parametrize("variant", ["sequential", "nested", "independent"])
def test_a_cms_language_model_with_the_fused_read_equals_the_reference_read(cls, variant):
    """Logits, loss, every parameter's gradient, the inner steps (the final fast weights) and a no-grad call."""
    torch.manual_seed(0)
    model = cls(vocab_size=50, dim=16, n_layers=2, n_heads=2, chunk_sizes=(4, 8), cms_inner_lr=0.5,
                cms_variant=variant, titans_chunk_size=4).double()
    x, y = torch.randint(0, 50, (2, 23)), torch.randint(0, 50, (2, 23))
    (a, ga), (b, gb) = _run(model, x, y, True), _run(model, x, y, False)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=1e-12)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=0, atol=1e-12, msg=n)
    for sa, sb in zip(a.state.cms, b.state.cms):
        for wa, wb in zip(sa.weights, sb.weights):
            torch.testing.assert_close(wa, wb, rtol=0, atol=1e-12)
    with torch.no_grad():
        model.fused_cms_read = True
        c = model(x)
        model.fused_cms_read = False
        d = model(x)
    torch.testing.assert_close(c.logits, d.logits, rtol=0, atol=1e-12)
