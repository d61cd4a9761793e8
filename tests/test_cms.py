"""Continuum Memory System (Eq 70-74) as a standalone layer with its local "next_input" objective."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from nested_learning.memory.cms import ContinuumMemorySystem, gelu_grad, is_zero_accumulator

DIM, CHUNKS = 8, (2, 4, 8)


def make(variant="sequential", inner_lr=0.3, **kw):
    torch.manual_seed(0)
    return ContinuumMemorySystem(DIM, CHUNKS, expansion=2, variant=variant, inner_lr=inner_lr, **kw).double()


def stream(cms, x, splits):
    ys, state, prev = [], None, 0
    for s in list(splits) + [x.shape[1]]:
        y, state = cms(x[:, prev:s], state)
        ys.append(y)
        prev = s
    return torch.cat(ys, 1), state


@torch.no_grad()
def test_level_changes_exactly_at_multiples_of_its_chunk_size_across_calls():
    cms = make()
    x = torch.randn(2, 26, DIM, dtype=torch.float64)
    y, state = cms(x[:, :3])  # a first call ending inside a segment
    prev = [w.clone() for w in state.weights]
    for p in range(4, 27):  # then one token per call: the stream position p is the number of tokens consumed
        y, state = cms(x[:, p - 1 : p], state)
        for level, C in enumerate(CHUNKS):
            changed = not torch.equal(state.weights[level], prev[level])
            assert changed == (p % C == 0), (p, level)
        prev = [w.clone() for w in state.weights]
    assert state.position == 26 - 26 % CHUNKS[0]


@torch.no_grad()
def test_zero_rates_give_the_plain_mlp_chain_and_never_change():
    cms = make(inner_lr=0.0)
    x = torch.randn(2, 19, DIM, dtype=torch.float64)
    y, state = cms(x)
    ref = x
    for up, down in zip(cms.up, cms.down):
        ref = ref + down(F.gelu(up(ref)))
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    for level in range(len(CHUNKS)):
        assert torch.equal(state.weights[level][0], cms.slow_weights(level))


@torch.no_grad()
def test_independent_variant_is_the_gated_sum_of_eq74():
    """Eq 74: y = u + sum_l softmax(W_g u)_l MLP_l(u) -- every level reads the same input u (no chain)."""
    cms = make("independent", inner_lr=0.0)
    with torch.no_grad():
        cms.gate.weight.normal_(0, 1.0)  # a non-uniform aggregation
    x = torch.randn(2, 11, DIM, dtype=torch.float64)
    y, _ = cms(x)
    gate = torch.softmax(cms.gate(x), dim=-1)
    ref = x + sum(gate[..., lv : lv + 1] * cms.down[lv](F.gelu(cms.up[lv](x))) for lv in range(len(CHUNKS)))
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    chain = x
    for up, down in zip(cms.up, cms.down):
        chain = chain + down(F.gelu(up(chain)))
    assert (y - chain).abs().max() > 1e-3  # not the Eq 70 chain


@torch.no_grad()
def test_variants_run_and_differ_and_nested_restarts_from_the_slower_level():
    x = torch.randn(1, 20, DIM, dtype=torch.float64)
    outs = {v: make(v)(x) for v in ("sequential", "independent", "nested")}
    (ys, _), (yi, _), (yn, _) = outs["sequential"], outs["independent"], outs["nested"]
    assert not torch.allclose(ys, yi) and not torch.allclose(yi, yn)
    # nested reads the chain of Eq 70 like sequential, until level 2 first closes a chunk (position 4)
    torch.testing.assert_close(yn[:, :4], ys[:, :4], rtol=0, atol=0)
    assert not torch.allclose(yn[:, 4:], ys[:, 4:])
    # copy: at position 16 (a boundary of every level) the whole hierarchy restarts from the slowest level
    _, s16 = make("nested", nested_init="copy")(x[:, :16])
    assert torch.equal(s16.weights[0], s16.weights[2]) and torch.equal(s16.weights[1], s16.weights[2])


def test_nested_restart_is_learned_from_the_slower_level():
    """Eq 72 (default "learned"): at a boundary of level s+1, level s restarts from its own slow weights plus
    lambda_s times level s+1's in-context change, lambda_s = sigmoid(a_s) trained by the outer loss. Unlike the copy,
    the levels stay distinct after a boundary of every level, and lambda_s = 0 gives a plain reset to theta_s^0."""
    x = torch.randn(1, 16, DIM, dtype=torch.float64)
    cms = make("nested")
    with torch.no_grad():
        cms.nested_logit.copy_(torch.tensor([0.3, -0.7]))
        _, s16 = cms(x)
        lam = torch.sigmoid(cms.nested_logit)
        for s in (1, 0):  # slowest first: level 1 restarts from level 2, then level 0 from the new level 1
            expected = cms.slow_weights(s) + lam[s] * (s16.weights[s + 1][0] - cms.slow_weights(s + 1))
            torch.testing.assert_close(s16.weights[s][0], expected, rtol=0, atol=1e-12)
        assert (s16.weights[0] - s16.weights[2]).abs().max() > 1e-3
        assert (s16.weights[2][0] - cms.slow_weights(2)).abs().max() > 1e-6  # the slowest level did learn
        cms.nested_logit.fill_(-float("inf"))
        _, reset = cms(x)
        assert torch.equal(reset.weights[0][0], cms.slow_weights(0))
    # the outer loss trains lambda: tokens after a boundary of level 2 (position 4) read the restarted level 1
    cms = make("nested")
    y, _ = cms(torch.randn(1, 12, DIM, dtype=torch.float64))
    (grad,) = torch.autograd.grad(y.pow(2).sum(), [cms.nested_logit])
    assert grad[0] != 0
    assert make("sequential").nested_logit is None
    with pytest.raises(ValueError, match="nested_init"):
        make("nested", nested_init="average")


@pytest.mark.parametrize("variant", ["sequential", "independent", "nested"])
@torch.no_grad()
def test_streaming_at_any_split_equals_one_shot(variant):
    cms = make(variant)
    x = torch.randn(2, 23, DIM, dtype=torch.float64)
    full, state = cms(x)
    for splits in ([1], [5], [3, 4, 11, 17], list(range(1, 23))):
        y, s = stream(cms, x, splits)
        torch.testing.assert_close(y, full, rtol=0, atol=1e-12)
        assert all(torch.equal(a, b) for a, b in zip(s.weights, state.weights))


@torch.no_grad()
def test_causal_changing_input_t_changes_no_earlier_output():
    cms = make()
    x = torch.randn(1, 20, DIM, dtype=torch.float64)
    base, _ = cms(x)
    for t in (0, 5, 13):
        x2 = x.clone()
        x2[:, t] += 1.0
        y, _ = cms(x2)
        torch.testing.assert_close(y[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(y[:, t:], base[:, t:])


def test_update_is_a_gradient_step_on_the_next_input_objective():
    """Level 1 after its first chunk = slow weights - eta/C * grad of 1/2 sum ||MLP_1(u_t) - u_{t+1}||^2 (autograd)."""
    cms = make(grad_clip=None)
    x = torch.randn(2, CHUNKS[0], DIM, dtype=torch.float64)
    with torch.no_grad():
        _, state = cms(x)
    theta = cms.slow_weights(0).detach().expand(2, -1).clone().requires_grad_()
    W_up, b_up, W_down, b_down = cms.unpack(theta)
    out = x + torch.baddbmm(
        b_down.unsqueeze(1), F.gelu(torch.baddbmm(b_up.unsqueeze(1), x, W_up.mT)), W_down.mT
    )
    loss = 0.5 * (out[:, :-1] - x[:, 1:]).pow(2).sum()
    (grad,) = torch.autograd.grad(loss, theta)
    eta = cms.inner_lr()[0].item()
    torch.testing.assert_close(state.weights[0], theta.detach() - eta / CHUNKS[0] * grad, rtol=0, atol=1e-12)
    assert torch.equal(state.grads[0], torch.zeros_like(grad))  # applied and reset at the boundary
    # level 2 waits for its own boundary, its gradient accumulated
    assert torch.equal(state.weights[1][0], cms.slow_weights(1)) and state.grads[1].abs().sum() > 0


@torch.no_grad()
def test_clipped_step_is_the_gradient_step_shortened_to_eta_times_the_clip():
    x = 3 * torch.randn(2, 16, DIM, dtype=torch.float64)
    clip = 0.05
    cms = make(grad_clip=clip)
    eta = cms.inner_lr()
    # level 1's first step, unclipped and clipped
    free = make(grad_clip=None)(x[:, :2])[1].weights[0] - cms.slow_weights(0)
    step = cms(x[:, :2])[1].weights[0] - cms.slow_weights(0)
    assert (free.norm(dim=1) > eta[0] * clip).all()  # the clip binds here
    torch.testing.assert_close(
        step, free * (eta[0] * clip / free.norm(dim=1, keepdim=True)), rtol=0, atol=1e-15
    )
    _, state = cms(x)  # after 16 tokens level l has taken 16 / C_l steps, each at most eta_l * clip long
    for level, C in enumerate(CHUNKS):
        moved = (state.weights[level] - cms.slow_weights(level)).norm(dim=1)
        assert (moved <= 16 // C * eta[level] * clip * (1 + 1e-12)).all()


def test_emptied_accumulators_hold_no_memory_and_step_as_dense_zeros():
    """A fresh state's accumulators and those a step empties broadcast one shared zero (no pass over a level's
    weights). A stream whose accumulators are dense zeros instead (a state read back from a file) takes the same
    steps, to the bit, and so does one whose state was detached (its copies share the zero)."""
    cms = make()
    x = torch.randn(2, 24, DIM, dtype=torch.float64)
    state = cms.initial_state(2, dtype=torch.float64)
    assert all(is_zero_accumulator(g) and g.shape == w.shape for g, w in zip(state.grads, state.weights))
    assert not is_zero_accumulator(torch.zeros_like(state.weights[0]))
    with torch.no_grad():
        _, s8 = cms(x[:, :8], state)  # position 8: every level has just stepped
        assert all(is_zero_accumulator(g) for g in s8.grads)
        _, s6 = cms(x[:, :6], state)  # position 6: levels 2 and 3 hold a gradient
        assert [is_zero_accumulator(g) for g in s6.grads] == [True, False, False]
        dense = dataclasses.replace(s6, grads=[g.clone(memory_format=torch.contiguous_format) for g in s6.grads])
        assert not any(is_zero_accumulator(g) for g in dense.grads)
        runs = [cms(x[:, 6:], s)[1] for s in (s6, dense, s6.detach())]
    for other in runs[1:]:
        for a, b in zip(runs[0].weights + runs[0].grads, other.weights + other.grads):
            assert torch.equal(a, b)


def test_gelu_grad_matches_autograd():
    x = torch.linspace(-6, 6, 101, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(F.gelu(x).sum(), x)
    torch.testing.assert_close(gelu_grad(x.detach()), g, rtol=0, atol=1e-14)


def test_meta_mode_trains_the_slow_weights_through_the_updates():
    """d(output after an update)/d(slow weights) differs between meta and first-order modes; meta matches finite
    differences of the whole stream (the update included), first-order does not."""
    x = torch.randn(1, 6, DIM, dtype=torch.float64)

    def objective(cms):
        y, _ = cms(x)
        return y[:, 2:].pow(2).sum()  # outputs after level 1's first update

    grads = {}
    for mode in ("first_order", "meta"):
        cms = make(mode=mode, inner_lr=0.3)
        (grads[mode],) = torch.autograd.grad(objective(cms), cms.up[0].weight)
    cms = make(inner_lr=0.3)
    direction = torch.randn_like(cms.up[0].weight)
    eps = 1e-5
    with torch.no_grad():
        cms.up[0].weight += eps * direction
        plus = objective(cms)
        cms.up[0].weight -= 2 * eps * direction
        minus = objective(cms)
    fd = (plus - minus) / (2 * eps)
    meta, first = (grads["meta"] * direction).sum(), (grads["first_order"] * direction).sum()
    assert abs(meta - fd) < 1e-6 * max(1.0, abs(fd))
    assert abs(first - fd) > 1e-3 * abs(fd)


def test_invalid_configuration_is_a_clear_error():
    with pytest.raises(ValueError, match="multiples"):
        ContinuumMemorySystem(8, (4, 6))
    with pytest.raises(ValueError, match="variant"):
        ContinuumMemorySystem(8, variant="parallel")
    with pytest.raises(ValueError, match="mode"):
        ContinuumMemorySystem(8, mode="second_order")


# ---------------------------------------------------------------------------------------- SwiGLU levels (Sec 7.3)
def make_swiglu(inner_lr=0.3, **kw):
    torch.manual_seed(0)
    return ContinuumMemorySystem(
        DIM, CHUNKS, level_form="swiglu", hidden=5, inner_lr=inner_lr, **kw
    ).double()


def swiglu_branch(x, gate, up, down):
    return down(F.silu(gate(x)) * up(x))


@torch.no_grad()
def test_swiglu_levels_with_zero_rates_are_the_llama_mlp_chain():
    cms = make_swiglu(inner_lr=0.0)
    assert cms.up[0].bias is None and cms.hidden == 5
    x = torch.randn(2, 11, DIM, dtype=torch.float64)
    y, state = cms(x)
    ref = x
    for gate, up, down in zip(cms.gate_proj, cms.up, cms.down):
        ref = ref + swiglu_branch(ref, gate, up, down)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    assert torch.equal(state.weights[2][1], cms.slow_weights(2))


def test_swiglu_update_is_a_gradient_step_on_the_next_input_objective():
    cms = make_swiglu(grad_clip=None)
    x = torch.randn(2, CHUNKS[0], DIM, dtype=torch.float64)
    with torch.no_grad():
        _, state = cms(x)
    theta = cms.slow_weights(0).detach().expand(2, -1).clone().requires_grad_()
    W_gate, W_up, W_down = cms.unpack(theta)
    out = x + (F.silu(x @ W_gate.mT) * (x @ W_up.mT)) @ W_down.mT
    loss = 0.5 * (out[:, :-1] - x[:, 1:]).pow(2).sum()
    (grad,) = torch.autograd.grad(loss, theta)
    eta = cms.inner_lr()[0].item()
    torch.testing.assert_close(state.weights[0], theta.detach() - eta / CHUNKS[0] * grad, rtol=0, atol=1e-12)


def test_swiglu_streaming_equals_one_shot_and_rejects_bad_forms():
    cms = make_swiglu()
    x = torch.randn(2, 23, DIM, dtype=torch.float64)
    with torch.no_grad():
        full, s_full = cms(x)
        parts, s_parts = stream(cms, x, [3, 9, 10, 17])
    torch.testing.assert_close(parts, full, rtol=0, atol=1e-12)
    for a, b in zip(s_full.weights, s_parts.weights):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="level_form"):
        ContinuumMemorySystem(DIM, CHUNKS, level_form="relu")
