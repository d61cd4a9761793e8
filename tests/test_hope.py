"""HOPE (Eq 94-97) and HOPE-attention: test-time CMS learning, exact streaming, causality, meta-gradients."""

import pytest
import torch
import torch.nn.functional as F

from nested_learning.models import HOPE, HOPEAttention
from nested_learning.models.base import lm_loss

V, CHUNKS = 64, (4, 8, 16)
MODELS = [HOPE, HOPEAttention]


def tiny(cls, dtype=torch.float64, **kw):
    cfg = dict(
        vocab_size=V,
        dim=16,
        n_layers=2,
        n_heads=2,
        chunk_sizes=CHUNKS,
        cms_inner_lr=0.5,
        titans_chunk_size=4,
        max_seq_len=None,
    )
    cfg.update(kw)
    torch.manual_seed(0)
    return cls(**cfg).to(dtype)


def stream(model, x, splits):
    logits, state, prev = [], None, 0
    for s in list(splits) + [x.shape[1]]:
        out = model(x[:, prev:s], state=state)
        logits.append(out.logits)
        state, prev = out.state, s
    return torch.cat(logits, 1), state


@pytest.mark.parametrize("cls", MODELS)
@torch.no_grad()
def test_streaming_at_any_split_equals_one_shot(cls):
    m = tiny(cls).eval()
    x = torch.randint(0, V, (2, 27))
    full = m(x)  # boundaries of the levels at 4, 8, 12, ..., 24; of all three at 16
    for splits in ([1], [13, 14], [3, 9, 17, 22], [5, 6, 7, 8, 9, 10]):
        logits, state = stream(m, x, splits)
        torch.testing.assert_close(logits, full.logits, rtol=0, atol=1e-9)
        for a, b in zip(state.cms, full.state.cms):
            assert all(torch.allclose(wa, wb, rtol=0, atol=1e-9) for wa, wb in zip(a.weights, b.weights))


def segment_by_segment_grads(model, x, y, size):
    """Parameter gradients of the summed NLL with the stream fed one segment per call (the state's graph kept),
    and the state after the last whole segment."""
    state, total, whole = None, 0.0, None
    for a in range(0, x.shape[1], size):
        out = model(x[:, a : a + size], state=state, labels=y[:, a : a + size])
        total = total + out.loss * (y[:, a : a + size] != -100).sum()
        state = out.state
        whole = state if a + size <= x.shape[1] else whole
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads, whole


def assert_one_call_equals_segment_calls(model, x, y, size, atol):
    out = model(x, labels=y)
    (out.loss * (y != -100).sum()).backward()
    one = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    by_segment, state = segment_by_segment_grads(model, x, y, size)
    assert one.keys() == by_segment.keys() and len(one) > 4
    for n, g in one.items():
        torch.testing.assert_close(g, by_segment[n], rtol=0, atol=atol, msg=n)
    # the call's state is taken at its last segment boundary, before the pending tokens
    flat = {n: t for n, t in out.state.flatten().items() if n.startswith(("mixers", "cms"))}
    flat_by_segment = {n: t for n, t in state.flatten().items() if n.startswith(("mixers", "cms"))}
    assert flat.keys() == flat_by_segment.keys() and any(n.startswith("mixers.0") for n in flat)
    for n, t in flat.items():
        torch.testing.assert_close(t, flat_by_segment[n], rtol=0, atol=atol, msg=n)


@pytest.mark.parametrize("cls", MODELS)
def test_one_training_call_equals_segment_sized_calls_gradients_included(cls):
    """Training on a stream in one call or in segment-sized calls (the state's graph carried between them) is the
    same computation: loss, every parameter's gradient and the state agree."""
    m = tiny(cls).train()
    x, y = torch.randint(0, V, (2, 26)), torch.randint(0, V, (2, 26))  # ends inside a segment
    y[1, 5] = -100
    assert_one_call_equals_segment_calls(m, x, y, CHUNKS[0], atol=1e-10)


def test_a_hopeified_model_trains_the_same_in_one_call_as_in_segment_sized_calls():
    """The same for a Hope-ified pretrained model whose first blocks keep their plain MLP."""
    transformers = pytest.importorskip("transformers")
    from nested_learning.models import hopeify

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True,
    )
    m = hopeify(transformers.LlamaForCausalLM(cfg), layers=(2,), chunk_sizes=(4, 8), inner_lr=0.5, window=10)
    m = m.double().train()
    x, y = torch.randint(0, V, (2, 22)), torch.randint(0, V, (2, 22))
    assert_one_call_equals_segment_calls(m, x, y, 4, atol=1e-10)


@pytest.mark.parametrize(
    "variant, objective", [("independent", "lm"), ("nested", "lm"), ("sequential", "next_input")]
)
@torch.no_grad()
def test_variants_and_the_local_objective_stream_exactly_and_learn(variant, objective):
    m = tiny(HOPEAttention, cms_variant=variant, cms_objective=objective).eval()
    x = torch.randint(0, V, (2, 27))
    full = m(x)
    logits, _ = stream(m, x, [3, 9, 17, 22])
    torch.testing.assert_close(logits, full.logits, rtol=0, atol=1e-9)
    m.set_test_time_updates(False)
    assert not torch.allclose(m(x).logits[:, 4:], full.logits[:, 4:])


@pytest.mark.parametrize("cls", MODELS)
@torch.no_grad()
def test_causal_changing_token_t_changes_no_earlier_logit(cls):
    m = tiny(cls).eval()
    x = torch.randint(0, V, (1, 26))
    base = m(x).logits
    for t in (0, 7, 18, 25):
        x2 = x.clone()
        x2[:, t] = (x2[:, t] + 1) % V
        out = m(x2).logits
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(out[:, t:], base[:, t:])


@torch.no_grad()
def test_levels_change_exactly_at_multiples_of_their_chunk_size_across_calls():
    m = tiny(HOPEAttention).eval()
    x = torch.randint(0, V, (1, 34))
    state = m(x[:, :2]).state
    prev = [w.clone() for w in state.cms[0].weights]
    for p in range(3, 35):  # one token per call: p tokens consumed
        state = m(x[:, p - 1 : p], state=state).state
        for level, C in enumerate(CHUNKS):
            assert (not torch.equal(state.cms[0].weights[level], prev[level])) == (p % C == 0), (p, level)
        prev = [w.clone() for w in state.cms[0].weights]


@pytest.mark.parametrize("cls", MODELS)
@torch.no_grad()
def test_test_time_updates_switch(cls):
    m = tiny(cls).eval()
    x = torch.randint(0, V, (1, 20))
    on = m(x)
    m.set_test_time_updates(False)
    off = m(x)
    # identical before the first boundary (position 4), different after it
    torch.testing.assert_close(on.logits[:, :4], off.logits[:, :4], rtol=0, atol=0)
    assert not torch.allclose(on.logits[:, 4:], off.logits[:, 4:])
    assert all(
        torch.equal(w[0], m.blocks[0].cms.slow_weights(lv)) for lv, w in enumerate(off.state.cms[0].weights)
    )


def _lm_grads(m, state, ids):
    """Reference inner gradient: the in-segment next-token loss of ``ids`` (from ``state``, levels frozen) w.r.t.
    the CMS fast weights of every level of every block (made leaves)."""
    leaves = [[w.detach().clone().requires_grad_() for w in cs.weights] for cs in state.cms]
    for cs, ws in zip(state.cms, leaves):
        cs.weights = ws
    m.set_test_time_updates(False)
    logits = m(ids, state=state).logits
    m.set_test_time_updates(True)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="sum")
    flat = torch.autograd.grad(loss, [w for ws in leaves for w in ws])
    return [w.detach() for ws in leaves for w in ws], list(flat)


def test_inner_update_is_a_gradient_step_on_the_in_segment_lm_loss():
    """Eq 71 with the "lm" objective: level l's step = eta_l / C_l * sum of its segment gradients, each the gradient
    of the segment's next-token loss with the state at the segment start held fixed; level 2 waits for 2 segments."""
    m = tiny(HOPE, cms_inner_lr=0.1, cms_grad_clip=None)
    x = torch.randint(0, V, (2, 8))
    w0, g1 = _lm_grads(m, m.initial_state(2), x[:, :4])
    with torch.no_grad():
        s4 = m(x[:, :4]).state
    w4, g2 = _lm_grads(m, m(x[:, :4]).state, x[:, 4:])
    with torch.no_grad():
        s8 = m(x).state
    eta = [b.cms.inner_lr().detach() for b in m.blocks]
    k = len(CHUNKS)
    for i in range(len(m.blocks)):
        lvl = lambda level, i=i: i * k + level  # noqa: E731
        torch.testing.assert_close(
            s4.cms[i].weights[0], w0[lvl(0)] - eta[i][0] / 4 * g1[lvl(0)], rtol=0, atol=1e-10
        )
        # level 2 has accumulated its first segment's gradient but not applied it
        torch.testing.assert_close(s4.cms[i].grads[1], g1[lvl(1)], rtol=0, atol=1e-10)
        assert torch.equal(s4.cms[i].weights[1], w0[lvl(1)])
        expected = w0[lvl(1)] - eta[i][1] / 8 * (g1[lvl(1)] + g2[lvl(1)])
        torch.testing.assert_close(s8.cms[i].weights[1], expected, rtol=0, atol=1e-10)
        torch.testing.assert_close(
            s8.cms[i].weights[0], w4[lvl(0)] - eta[i][0] / 4 * g2[lvl(0)], rtol=0, atol=1e-10
        )
        torch.testing.assert_close(s8.cms[i].grads[2], g1[lvl(2)] + g2[lvl(2)], rtol=0, atol=1e-10)


@pytest.mark.parametrize("cls", MODELS)
def test_training_call_takes_the_same_inner_steps_as_a_no_grad_call(cls):
    """While training with labels the head keeps softmax @ W for the outer backward and the inner gradients read it
    from there; without grad they compute it themselves. Both must take the same steps (and give the same logits)."""
    m = tiny(cls)
    x, y = torch.randint(0, V, (2, 21)), torch.randint(0, V, (2, 21))
    trained = m(x, labels=y)
    with torch.no_grad():
        plain = m(x)
    torch.testing.assert_close(trained.logits.detach(), plain.logits, rtol=0, atol=1e-12)
    for a, b in zip(trained.state.cms, plain.state.cms):
        for wa, wb in zip(a.weights, b.weights):
            torch.testing.assert_close(wa.detach(), wb, rtol=0, atol=1e-12)
    assert any(not torch.equal(w, w0) for w, w0 in zip(plain.state.cms[0].weights, m.initial_state(2).cms[0].weights))


def test_meta_mode_backpropagates_through_the_inner_updates():
    """The outer gradient w.r.t. a slow CMS weight matches finite differences of the loss (inner updates included)
    in meta mode; first-order mode, which detaches the inner gradients, does not."""
    x = torch.randint(0, V, (1, 16))
    grads = {}
    for mode in ("first_order", "meta"):
        m = tiny(HOPEAttention, cms_mode=mode)
        (grads[mode],) = torch.autograd.grad(m(x, labels=x).loss, m.blocks[0].cms.down[0].weight)
    m = tiny(HOPEAttention)
    w = m.blocks[0].cms.down[0].weight
    direction = torch.randn_like(w)
    eps = 1e-4
    with torch.no_grad():
        w += eps * direction
        plus = m(x, labels=x).loss
        w -= 2 * eps * direction
        minus = m(x, labels=x).loss
    fd = ((plus - minus) / (2 * eps)).item()
    meta, first = (grads["meta"] * direction).sum().item(), (grads["first_order"] * direction).sum().item()
    assert abs(meta - fd) < 1e-4 * abs(fd)
    assert abs(first - fd) > 1e-2 * abs(fd)


@pytest.mark.parametrize("cls", MODELS)
def test_fused_first_order_path_equals_meta_path_when_rates_are_zero(cls):
    """Two code paths for the outer loss and head gradient: with eta = 0 meta and first-order must agree."""
    x, y = torch.randint(0, V, (2, 13)), torch.randint(0, V, (2, 13))
    y[0, 3] = -100
    grads = {}
    for mode in ("first_order", "meta"):
        m = tiny(cls, cms_inner_lr=0.0, cms_mode=mode)
        out = m(x, labels=y)
        torch.testing.assert_close(out.loss, lm_loss(out.logits, y).double(), rtol=0, atol=1e-6)
        out.loss.backward()
        grads[mode] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert grads["meta"].keys() == grads["first_order"].keys()
    for n, g in grads["meta"].items():
        torch.testing.assert_close(grads["first_order"][n], g, rtol=0, atol=1e-12)


def _hope_by_hand(model, ids, order="titans_then_cms"):
    """Eq 94-97 written out from the model's own modules, for one segment (initial fast weights): per block
    o = SMT(norm1(x)), x = x + o, u = norm2(x), x = x + CMS(u) - u; ``order`` gives the alternatives a wrong
    wiring would compute."""
    x = model.embed(ids)
    for block in model.blocks:
        cms_state = block.cms.initial_state(ids.shape[0], dtype=x.dtype)
        if order == "titans_then_cms":
            x = x + block.mixer(block.norm1(x))[0]
            u = block.norm2(x)
            x = x + block.cms(u, cms_state)[0] - u
        elif order == "cms_then_titans":
            u = block.norm2(x)
            x = x + block.cms(u, cms_state)[0] - u
            x = x + block.mixer(block.norm1(x))[0]
        else:  # "parallel": the CMS reads the block input, not the Titans output
            o = block.mixer(block.norm1(x))[0]
            u = block.norm2(x)
            x = x + o + block.cms(u, cms_state)[0] - u
    return model.head(model.norm(x))


@torch.no_grad()
def test_hope_block_runs_titans_then_the_cms_on_its_output():
    """Eq 94-97: the CMS chain of a block reads the self-modifying Titans output of the same block. The by-hand
    logits equal the model's; the two wrong wirings give different logits, so this test would catch either."""
    torch.manual_seed(0)
    model = HOPE(vocab_size=50, dim=16, n_layers=2, n_heads=2, chunk_sizes=(16, 32), cms_inner_lr=0.5,
                 titans_chunk_size=4).double().eval()
    with torch.no_grad():  # non-trivial CMS levels: their zero-init would hide a wrong CMS input
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 50, (2, 16))  # one segment: no level steps inside it
    logits = model(ids).logits
    torch.testing.assert_close(logits, _hope_by_hand(model, ids), rtol=1e-10, atol=1e-10)
    for wrong in ("cms_then_titans", "parallel"):
        assert (logits - _hope_by_hand(model, ids, wrong)).abs().max() > 1e-3, wrong


def _assert_same_training_call(run_a, run_b, atol: float, grad_atol: float) -> dict:
    """Two (output, parameter gradients) of one training call: the same logits, CMS states and gradients; returns
    the first run's gradients."""
    (a, ga), (b, gb) = run_a, run_b
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=atol)
    for sa, sb in zip(a.state.cms, b.state.cms):
        for wa, wb in zip(sa.weights, sb.weights):
            torch.testing.assert_close(wb, wa, rtol=0, atol=atol)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=0, atol=grad_atol, msg=n)
    return ga


def test_the_inner_gradients_skip_the_titans_memory_gradients_and_change_nothing(monkeypatch):
    """The levels' inner gradient runs back through layer 1's Titans chunk steps with their memory gradients
    skipped (``inputs_only_gradients``); the inner steps, logits, loss and every parameter gradient are those of the
    full backward."""
    import contextlib

    from nested_learning.memory import self_modifying_chunk_grad as cg
    from nested_learning.models import cms_lm

    x, y = torch.randint(0, V, (2, 26)), torch.randint(0, V, (2, 26))
    runs, modes = {}, []
    backward = cg._backward_values

    def recording(*args):
        modes.append(not args[4])  # states=False: x's and q's gradients only
        return backward(*args)

    monkeypatch.setattr(cg, "_backward_values", recording)
    for skip in (True, False):
        if not skip:
            monkeypatch.setattr(cms_lm, "inputs_only_gradients", contextlib.nullcontext)
        m = tiny(HOPE).train()
        out = m(x, labels=y)
        out.loss.backward()
        runs[skip] = (out, {n: p.grad for n, p in m.named_parameters() if p.grad is not None})
        if skip:
            assert any(modes) and not all(modes)  # the inner passes skip, the outer backward does not
    _assert_same_training_call(runs[False], runs[True], atol=0, grad_atol=1e-13)


@pytest.mark.parametrize("whole_chunk_calls", [False, True])
def test_hope_with_the_compiled_hand_written_chunk_step_equals_eager(whole_chunk_calls):
    """The Titans chunk step's hand-written forward and backward compiled (aot_eager: the tracing without C++
    kernels) inside a whole HOPE training step, its inner gradients' inputs-only backward included; or, with
    ``whole_chunk_calls``, every segment's Titans layer call compiled whole (the 2-token partial segment at the end
    of the 26 ids stays on the compiled chunk step's path)."""
    x, y = torch.randint(0, V, (2, 26)), torch.randint(0, V, (2, 26))
    runs = []
    for backend in (None, "aot_eager"):
        m = tiny(HOPE).train()
        m.compile_chunk_steps(backend, whole_chunk_calls=whole_chunk_calls)
        out = m(x, labels=y)
        out.loss.backward()
        expected = backend if whole_chunk_calls else None  # compiled throughout: no fallback to eager
        assert all(b.mixer.whole_chunk_backend == expected for b in m.blocks)
        runs.append((out, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    _assert_same_training_call(*runs, atol=1e-10, grad_atol=1e-9)


@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_hope_with_each_blocks_norms_inside_its_titans_call_equals_the_blocks_as_written(backend):
    """``fused_mixer_residual`` (default): each block's ``x + mixer(norm1(x))`` and ``norm2`` of it in one layer
    call (``SelfModifyingTitans.residual_forward``; with compiled layer calls, one graph). Against the block as
    written, op by op: the same logits, CMS states and gradients, eagerly and with every segment's layer call
    compiled (aot_eager), over a stream that ends inside a segment."""
    x, y = torch.randint(0, V, (2, 26)), torch.randint(0, V, (2, 26))
    runs = []
    for fused in (False, True):
        m = tiny(HOPE).train()
        m.fused_mixer_residual = fused
        m.compile_chunk_steps(backend)
        out = m(x, labels=y)
        out.loss.backward()
        runs.append((out, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    grads = _assert_same_training_call(*runs, atol=1e-12, grad_atol=1e-10)
    assert any(".norm1." in n for n in grads) and any(".norm2." in n for n in grads)


def test_meta_mode_with_compiled_titans_runs_the_layer_calls_as_before():
    """Meta mode differentiates the Titans layers' backward again (create_graph), which a compiled layer graph does
    not support: the model runs those calls uncompiled there, with the eager gradients."""
    x = torch.randint(0, V, (1, 17))
    grads = []
    for backend in (None, "aot_eager"):
        m = tiny(HOPE, cms_mode="meta", titans_compile=backend).train()
        m(x, labels=x).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0, atol=1e-12, msg=n)


def test_a_training_step_runs_in_a_thread_other_than_the_main_one():
    """Thread-local switches (the inner gradients' inputs-only backward, the thread policy) start unset in a new
    thread: a step there gives the main thread's loss and gradients."""
    import threading

    x, y = torch.randint(0, V, (1, 20)), torch.randint(0, V, (1, 20))
    runs = []

    def step():
        m = tiny(HOPE).train()
        out = m(x, labels=y)
        out.loss.backward()
        runs.append((out.loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]))

    step()
    worker = threading.Thread(target=step)
    worker.start()
    worker.join()
    assert len(runs) == 2
    (la, ga), (lb, gb) = runs
    torch.testing.assert_close(lb, la, rtol=0, atol=0)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
