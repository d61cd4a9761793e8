"""The head's products through oneDNN (``ops/fast_linear.py``) against PyTorch's own, values and gradients, the
cases that fall back to PyTorch's product, and on which CPUs oneDNN is the default."""

import pytest
import torch
import torch.nn.functional as F

from nested_learning.models import build_model
from nested_learning.ops import fast_linear as fl

needs_onednn = pytest.mark.skipif(fl._kernel() is None, reason="this PyTorch has no oneDNN linear kernel")


def _layouts(M, K, N, seed=0):
    """(x, w) pairs with x @ w.T: (M, N), each operand contiguous or a transposed view."""
    gen = torch.Generator().manual_seed(seed)
    x, w = torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen)
    return [(x, w), (x.t().contiguous().t(), w), (x, w.t().contiguous().t()), (x.t().contiguous().t(), w.t().contiguous().t())]


@needs_onednn
@pytest.mark.parametrize("M, K, N", [(16, 128, 3000), (1, 64, 7), (37, 300, 129)])
def test_linear_equals_the_library_product(M, K, N):
    """Against the exact (fp64) product, oneDNN's fp32 result is as close as PyTorch's own (both round sums of K
    products in some order)."""
    for x, w in _layouts(M, K, N):
        with fl.onednn_products():
            assert fl.onednn_applies(x, w)
            fast = fl.linear(x, w)
        exact = x.double() @ w.double().t()
        err_fast = (fast.double() - exact).abs().max().item()
        err_library = (x @ w.t() - exact).abs().max().item()
        assert err_fast <= 4 * err_library + 1e-6 * exact.abs().max().item()


def test_fallbacks_are_the_library_product(monkeypatch):
    x, w = torch.randn(5, 8), torch.randn(6, 8)
    with fl.onednn_products(), fl.library_products():  # the innermost choice holds
        assert not fl.onednn_applies(x, w)
    with fl.onednn_products():
        assert not fl.onednn_applies(x.double(), w.double())
        assert not fl.onednn_applies(x[None], w)  # 2-D operands only
        assert not fl.onednn_applies(x[:0], w)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not fl.onednn_applies(x, w)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert not fl.onednn_applies(x, w)
        monkeypatch.undo()
    assert torch.equal(fl.linear(x.double(), w.double()), x.double() @ w.double().t())
    with fl.library_products():
        assert torch.equal(fl.linear(x, w), x @ w.t())


@pytest.mark.parametrize("expanded", [False, True])
def test_head_linear_gradients_equal_f_linear(expanded):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 16, generator=gen, requires_grad=True)
    w = torch.randn(40, 16, generator=gen, requires_grad=True)
    outs = []
    for fn in (fl.head_linear, F.linear):
        with fl.onednn_products():
            y = fn(x, w)
        # a sum hands the backward a stride-0 gradient
        loss = y.sum() if expanded else (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(2))).sum()
        outs.append((y, *torch.autograd.grad(loss, (x, w))))
    if fl._kernel() is not None:
        assert outs[0][0].grad_fn is not None and "HeadLinear" in str(outs[0][0].grad_fn.next_functions)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_head_linear_second_order_equals_f_linear():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 12, generator=gen, requires_grad=True)
    w = torch.randn(20, 12, generator=gen, requires_grad=True)
    second = []
    for fn in (fl.head_linear, F.linear):
        g = torch.autograd.grad(fn(x, w).square().sum(), (x, w), create_graph=True)
        second.append(torch.autograd.grad(sum(t.square().sum() for t in g), (x, w)))
    for a, b in zip(*second):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["transformer", "hope", "titans", "deltanet"])
def test_models_train_the_same_with_either_product(name):
    """A training step's loss and gradients with the large products through oneDNN equal those with PyTorch's own
    (HOPE: the segment head's logits, softmax @ W and the tied weight's gradient; the others: their head and their
    layers' projections over the sequence)."""
    x = torch.randint(0, 500, (1, 64), generator=torch.Generator().manual_seed(4))
    results = []
    for context in (fl.library_products, fl.onednn_products):
        torch.manual_seed(0)
        model = build_model(name, "tiny", vocab_size=500)
        with context():
            out = model(x, labels=x)
            out.loss.backward()
        results.append((out.loss.detach(), out.logits.detach(), model.embed.weight.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_kernel_that_fails_falls_back_for_good(monkeypatch):
    def broken(*args):
        raise RuntimeError("no kernel for this CPU")

    monkeypatch.setitem(fl._KERNEL, "fn", broken)
    x, w = torch.randn(4, 8), torch.randn(5, 8)
    with fl.onednn_products():
        with pytest.warns(RuntimeWarning, match="oneDNN"):
            y = fl.linear(x, w)
        assert torch.equal(y, x @ w.t())
        assert not fl.onednn_applies(x, w)  # not tried again


def test_a_replaced_head_is_called_as_it_is():
    model = build_model("transformer", "tiny", vocab_size=50)
    model.head = torch.nn.Linear(model.dim, 50, bias=True)
    calls = []
    model.head.register_forward_hook(lambda module, args, out: calls.append(out))
    logits = model(torch.randint(0, 50, (1, 8))).logits
    assert len(calls) == 1 and torch.equal(logits, calls[0])


@needs_onednn
def test_flop_counter_counts_the_kernel():
    from torch.utils.flop_counter import FlopCounterMode

    x, w = torch.randn(16, 128), torch.randn(300, 128)
    with fl.onednn_products(), FlopCounterMode(display=False) as counter:
        fl.linear(x, w)
    assert counter.get_total_flops() == 2 * 16 * 128 * 300
    # forward and backward of the head: three products
    with fl.onednn_products(), FlopCounterMode(display=False) as counter:
        fl.head_linear(x.requires_grad_(), w.requires_grad_()).sum().backward()
    assert counter.get_total_flops() == 3 * 2 * 16 * 128 * 300


def test_linear_layer_takes_the_kernel_for_a_plain_layer_over_enough_rows():
    """``linear_layer``: a bias-free ``nn.Linear`` over ``MIN_LAYER_ROWS`` rows or more goes through the kernel
    (values and gradients as the layer's own call); fewer rows, a bias or a subclass: the layer's own call."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 24, bias=False)
    x = torch.randn(2, fl.MIN_LAYER_ROWS, 16, requires_grad=True)
    with fl.onednn_products():
        y = fl.linear_layer(layer, x)
    grads = torch.autograd.grad(y.square().sum(), (x, layer.weight))
    ref = layer(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, layer.weight))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    used = []
    original = fl.head_linear

    def spy(*args):
        used.append(True)
        return original(*args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fl, "head_linear", spy)
        fl.linear_layer(layer, x)
        assert used == [True]
        fl.linear_layer(layer, x[:, :1])  # 2 rows
        biased = torch.nn.Linear(16, 24)
        assert torch.equal(fl.linear_layer(biased, x), biased(x))

        class Scaled(torch.nn.Linear):
            def forward(self, t):
                return 2 * super().forward(t)

        scaled = Scaled(16, 24, bias=False)
        assert torch.equal(fl.linear_layer(scaled, x), scaled(x))
        assert used == [True]


def test_the_neural_memory_trains_the_same_with_either_product():
    """The Titans neural memory's projections through oneDNN (``linear_layer``): output and every gradient as with
    PyTorch's own product."""
    from nested_learning.memory import NeuralMemory

    x = torch.randn(1, 128, 64, generator=torch.Generator().manual_seed(1))
    results = []
    for context in (fl.library_products, fl.onednn_products):
        torch.manual_seed(0)
        layer = NeuralMemory(64, n_heads=2, chunk_size=16)
        with context():
            y, _ = layer(x)
            y.square().mean().backward()
        results.append((y.detach(), *(p.grad.clone() for p in layer.parameters() if p.grad is not None)))
    assert len(results[0]) == len(results[1]) > 3
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_default_follows_this_cpu(monkeypatch):
    x, w = torch.randn(5, 8), torch.randn(6, 8)
    for preferred in (False, True):
        monkeypatch.setattr(fl, "onednn_preferred", lambda p=preferred: p)
        assert fl.onednn_applies(x, w) is (preferred and fl._kernel() is not None)
        with fl.library_products():
            assert not fl.onednn_applies(x, w)
        with fl.onednn_products():
            assert fl.onednn_applies(x, w) is (fl._kernel() is not None)


@needs_onednn
@pytest.mark.parametrize("transposed", [False, True])
def test_a_prepacked_weight_gives_the_same_product(transposed):
    """The weight reordered once (``prepack``) gives the product of the weight as it is, to rounding, for as many
    rows as it was made for and for fewer (a call's last, partial segment); a transposed view is reordered too."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(300, 40, generator=gen)
    w = w.t() if transposed else w  # (40, 300) as a view: the head's transpose for softmax @ W
    with fl.onednn_products():
        packed = fl.prepack(w, 16)
        assert packed is not None and packed.fits(w)
        for rows in (16, 3):
            x = torch.randn(rows, w.shape[1], generator=gen)
            exact = x.double() @ w.double().t()
            err = (fl.linear(x, w, packed).double() - exact).abs().max().item()
            assert err <= 4 * (x @ w.t() - exact).abs().max().item() + 1e-6 * exact.abs().max().item()


@needs_onednn
def test_a_prepacked_weight_is_not_used_once_the_weight_changes():
    """After an in-place change (an optimizer's step bumps the version counter), and for another tensor or another
    view of the same storage, the reordered copy no longer fits, and the product takes the weight as it is now."""
    gen = torch.Generator().manual_seed(6)
    w = torch.nn.Parameter(torch.randn(50, 8, generator=gen))
    x = torch.randn(4, 8, generator=gen)
    with fl.onednn_products():
        packed = fl.prepack(w.detach(), 4)
        assert packed.fits(w) and packed.fits(w.detach())  # views share the version counter
        with torch.no_grad():
            w.add_(1.0)
        assert not packed.fits(w)
        torch.testing.assert_close(fl.linear(x, w, packed), x @ w.detach().t(), rtol=1e-5, atol=1e-5)
        assert not packed.fits(w.detach().clone())
        assert not packed.fits(w.detach()[:25])


def test_prepack_is_none_where_the_product_is_not_onednns():
    w = torch.randn(20, 8)
    with fl.library_products():
        assert fl.prepack(w, 4) is None
    with fl.onednn_products():
        assert fl.prepack(w.double(), 4) is None
        assert fl.prepack(w, 0) is None
    x = torch.randn(3, 8)
    assert torch.equal(fl.linear(x, w, None), fl.linear(x, w))


def test_an_inference_tensor_is_not_prepacked():
    """It has no version counter, so an in-place change could not be told: its products take it as it is."""
    with torch.inference_mode():
        w = torch.randn(20, 8)
        with fl.onednn_products():
            assert fl.prepack(w, 4) is None
