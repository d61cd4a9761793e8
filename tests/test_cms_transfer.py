"""Knowledge transfer between CMS levels (Eq 24-30, 72-73): each mode's defining property, and streaming exactness."""

import pytest
import torch

from nested_learning.memory import ContinuumMemorySystem
from nested_learning.models.hope import HOPE

D = torch.float64
CHUNKS = (2, 4)


def _cms(transfer="init", **kw):
    torch.manual_seed(0)
    return ContinuumMemorySystem(4, CHUNKS, expansion=2, inner_lr=0.5, transfer=transfer, **kw).double()


def _x(T=8):
    return torch.randn(2, T, 4, dtype=D, generator=torch.Generator().manual_seed(1))


def test_default_transfer_is_init_and_changes_nothing():
    plain, init = _cms(), _cms(("init", "init"))
    assert list(plain.state_dict()) == list(init.state_dict())  # no parameters of its own
    x = _x()
    (y0, s0), (y1, s1) = plain(x), init(x)
    assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(s0.weights, s1.weights))
    # Eq 72-73: the stream starts from the learned slow weights, and the outer loss reaches them
    start = plain.initial_state(2, dtype=D).weights[0]
    assert torch.equal(start[0], plain.slow_weights(0))
    y0.pow(2).sum().backward()
    assert plain.up[0].weight.grad.abs().sum() > 0


def test_initial_weights_are_meta_learned_through_the_stream():
    """Eq 72-73 with mode="meta": the outer gradient at the slow initial weights, taken through every inner step of
    the stream, equals a central finite difference of the loss (fp64). (The default first-order mode drops the
    inner steps' dependence on them, so there the two differ by design.)"""
    cms, x = _cms(mode="meta"), _x()
    (grad,) = torch.autograd.grad(cms(x)[0].pow(2).sum(), [cms.up[0].weight])
    direction = torch.randn(grad.shape, dtype=D, generator=torch.Generator().manual_seed(2))
    losses = []
    with torch.no_grad():
        for sign in (1, -1):
            cms.up[0].weight.add_(sign * 1e-6 * direction)
            losses.append(cms(x)[0].pow(2).sum())
            cms.up[0].weight.sub_(sign * 1e-6 * direction)
    analytic = (grad * direction).sum()
    assert abs(analytic) > 1e-3
    torch.testing.assert_close(analytic, (losses[0] - losses[1]) / 2e-6, rtol=1e-6, atol=1e-8)


def _outer_grads(cms, x):
    y, _ = cms(x)
    return torch.autograd.grad(y.pow(2).sum(), list(cms.parameters()), allow_unused=True)


def test_backprop_transfer_is_the_meta_gradient_through_the_inner_updates():
    x = _x()
    meta = _outer_grads(_cms(mode="meta"), x)
    backprop = _outer_grads(_cms("backprop"), x)
    first_order = _outer_grads(_cms(), x)
    for a, b in zip(meta, backprop):
        assert (a - b).abs().max() < 1e-12
    assert max((a - b).abs().max().item() for a, b in zip(meta, first_order)) > 1e-6


def test_backprop_transfer_in_hope_equals_meta_mode():
    kw = dict(vocab_size=32, dim=8, n_layers=1, n_heads=2, chunk_sizes=(2, 4), titans_chunk_size=2, cms_expansion=2)
    ids = torch.randint(0, 32, (1, 9))
    grads = []
    for extra in (dict(cms_mode="meta"), dict(cms_transfer="backprop"), {}):
        torch.manual_seed(0)
        model = HOPE(**kw, **extra).double()
        loss = model(ids, labels=ids.roll(-1, 1)).loss
        grads.append(torch.autograd.grad(loss, model.blocks[0].cms.up[0].weight)[0])
    assert (grads[0] - grads[1]).abs().max() < 1e-12
    assert (grads[0] - grads[2]).abs().max() > 1e-9


def test_direct_connection_conditions_the_faster_level_on_the_slower_ones_weights():
    x = _x(2)
    for transfer, depends in ((("direct", "init"), True), (("init", "init"), False)):
        cms = _cms(transfer, variant="independent")
        w = cms.initial_state(2, dtype=D).weights
        w_other = [w[0], w[1] + 0.1 * torch.randn_like(w[1])]
        delta = cms.read(x, w)[1][0].delta
        assert ((cms.read(x, w_other)[1][0].delta - delta).abs().max() > 1e-6) == depends
    # the read is level 0's form with theta_0 + gamma theta_1; level 1 is read with its own weights
    cms = _cms(("direct", "init"), variant="independent")
    with torch.no_grad():
        cms.transfer.gain[0] = 0.3
    w = cms.initial_state(2, dtype=D).weights
    expected = cms.form.read(x, w[0] + 0.3 * w[1]).delta
    _, cache = cms.read(x, w)
    assert (cache[0].delta - expected).abs().max() < 1e-14
    assert (cache[1].delta - cms.form.read(x, w[1]).delta).abs().max() < 1e-14
    # each level keeps its own gradient flow: level 1's inner gradient is the same with or without the connection
    g_direct = cms.local_grads(cache, w)[1]
    plain = _cms("init", variant="independent")
    assert (plain.local_grads(plain.read(x, w)[1], w)[1] - g_direct).abs().max() < 1e-14


def test_weight_generation_restarts_the_faster_level_at_the_slower_ones_boundaries():
    cms = _cms(("generate", "init"))
    with torch.no_grad():
        cms.transfer.generator[0] = torch.tensor([0.5, 2.0, -1.0, 0.25], dtype=D)
    x = _x(8)
    with torch.no_grad():
        _, at2 = cms(x[:, :2])  # level 0's own boundary only: its Eq 71 step, no generation
        _, at4 = cms(x[:, 2:4], at2)  # level 1's boundary: level 0 is generated from level 1
    plain = _cms()
    with torch.no_grad():
        _, plain2 = plain(x[:, :2])
    assert torch.equal(at2.weights[0], plain2.weights[0])
    sizes = cms.form.sizes()
    gains = torch.repeat_interleave(cms.transfer.generator[0], torch.tensor(sizes))
    expected = cms.slow_weights(0) + gains * (at4.weights[1] - cms.slow_weights(1))
    assert (at4.weights[0] - expected).abs().max() < 1e-14
    assert torch.equal(at4.grads[0], torch.zeros_like(at4.grads[0]))
    # the generator is learned by the outer loss
    y, _ = cms(x)
    assert torch.autograd.grad(y.pow(2).sum(), cms.transfer.generator)[0].abs().sum() > 0


@pytest.mark.parametrize("transfer", ["init", "backprop", ("direct", "init"), ("generate", "init")], ids=str)
def test_streaming_equals_one_shot_for_every_transfer(transfer):
    cms = _cms(transfer)
    x = _x(11)
    with torch.no_grad():
        y, s = cms(x)
        state, parts = None, []
        for a, b in ((0, 3), (3, 4), (4, 9), (9, 11)):
            out, state = cms(x[:, a:b], state)
            parts.append(out)
    assert (torch.cat(parts, 1) - y).abs().max() < 1e-12
    assert all((a - b).abs().max() < 1e-12 for a, b in zip(state.weights, s.weights))


@pytest.mark.parametrize("transfer", [("direct", "init", "init"), ("generate", "generate", "init")], ids=str)
def test_hope_streams_exactly_with_transfers(transfer):
    torch.manual_seed(0)
    model = HOPE(vocab_size=32, dim=8, n_layers=1, n_heads=2, chunk_sizes=(2, 4, 8), titans_chunk_size=2,
                 cms_expansion=2, cms_transfer=transfer).double()
    ids = torch.randint(0, 32, (2, 19))
    with torch.no_grad():
        ref = model(ids).logits
        state, parts = None, []
        for a, b in ((0, 5), (5, 12), (12, 19)):
            out = model(ids[:, a:b], state=state)
            state = out.state
            parts.append(out.logits)
    assert (torch.cat(parts, 1) - ref).abs().max() < 1e-10


def test_invalid_transfers_raise():
    with pytest.raises(ValueError, match="slowest"):
        _cms(("init", "direct"))
    with pytest.raises(ValueError, match="one of"):
        _cms("teleport")
    with pytest.raises(ValueError, match="one entry per level"):
        _cms(("init",))
    with pytest.raises(ValueError, match="nested"):
        _cms(("generate", "init"), variant="nested")
