"""The fused tied head: its gradients equal plain autograd through ``F.cross_entropy(h @ W^T)``."""

import pytest
import torch
import torch.nn.functional as F

from nested_learning.models import build_model, tied_head
from nested_learning.models.tied_head import SegmentedHead, TiedHead, softmax_into
from nested_learning.ops import fast_linear


def _plain(h, W, labels, g_logits=None):
    logits = h @ W.T
    loss = F.cross_entropy(logits.reshape(-1, W.shape[0]), labels.reshape(-1), ignore_index=-100, reduction="sum")
    if g_logits is not None:
        loss = loss + (logits * g_logits).sum()
    return torch.autograd.grad(loss, (h, W))


def _inputs(B=2, T=5, d=4, V=11):
    torch.manual_seed(0)
    h = torch.randn(B, T, d, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, d, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    labels[0, 1] = -100
    return h, W, labels


@pytest.mark.parametrize("stored_probs", [False, True, "with_product"])
@pytest.mark.parametrize("with_logit_grad", [False, True])
def test_tied_head_gradients_equal_autograd(stored_probs, with_logit_grad):
    h, W, labels = _inputs()
    with torch.no_grad():
        logits = h @ W.T
        lse = torch.logsumexp(logits, -1)
        probs = logits.transpose(0, 1).contiguous() if stored_probs else None
        if probs is not None:
            torch.testing.assert_close(softmax_into(probs).T, lse, rtol=0, atol=1e-12)
        probs_W = probs @ W if stored_probs == "with_product" else None
    g_logits = torch.randn_like(logits) if with_logit_grad else None
    out, nll = TiedHead.apply(h, W, logits, lse, labels, probs, probs_W)
    loss = nll + ((out * g_logits).sum() if with_logit_grad else 0)
    got = torch.autograd.grad(loss, (h, W))
    for a, b in zip(got, _plain(h, W, labels, g_logits)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_second_backward_recomputes_the_consumed_softmax():
    h, W, labels = _inputs()
    with torch.no_grad():
        logits = h @ W.T
        lse = torch.logsumexp(logits, -1)
        probs = logits.transpose(0, 1).contiguous()
        softmax_into(probs)
    _, nll = TiedHead.apply(h, W, logits, lse, labels, probs)
    first = torch.autograd.grad(nll, (h, W), retain_graph=True)
    second = torch.autograd.grad(nll, (h, W))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("batch", [1, 3])
def test_segmented_head_keeps_logits_and_softmax_of_every_segment(batch):
    h, W, labels = _inputs(B=batch, T=9)
    head = SegmentedHead((batch, 9), W.detach(), direct=True, keep_probs=True)
    Wt = W.detach().T.contiguous()
    for a, b in [(0, 4), (4, 8), (8, 9)]:
        p = head.segment(h[:, a:b], Wt, a, b, need_probs=True)
        expect = torch.softmax(h[:, a:b - 1] @ W.T, -1).detach().transpose(0, 1)
        torch.testing.assert_close(p, expect, rtol=0, atol=1e-12)
        torch.testing.assert_close(head.probs_W_block(a, b - 1), expect @ W.detach(), rtol=0, atol=1e-12)
    logits, loss = head.finish(0, labels)
    torch.testing.assert_close(logits, (h @ W.T).detach(), rtol=0, atol=1e-12)
    expected = F.cross_entropy((h @ W.T).reshape(-1, W.shape[0]), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)


@pytest.mark.skipif(fast_linear._kernel() is None, reason="this PyTorch has no oneDNN linear kernel")
@pytest.mark.parametrize("batch", [1, 2])
def test_the_head_reordered_once_per_call_gives_the_same_steps(batch, monkeypatch):
    """HOPE with its head reordered once per call for the segments' products (``prepacked_head``) against reordering
    per product: the same loss, logits and gradients in training, and the same logits in a no-grad stream whose CMS
    levels learn (where ``softmax @ W`` serves the inner gradient alone). The reordered copies are made and used
    only in the first form, and only for calls of enough segments."""
    monkeypatch.setattr(tied_head, "PREPACK_MIN_SEGMENTS", 3)
    made = []

    def spy(w, rows):
        packed = fast_linear.prepack(w, rows)
        made.append((tuple(w.shape), rows, packed is not None))
        return packed

    monkeypatch.setattr(tied_head, "prepack", spy)
    kernel, blocked = fast_linear._kernel(), []

    def counting(x, w, *args):
        blocked.append(w.is_mkldnn)  # the reordered copy is a oneDNN tensor
        return kernel(x, w, *args)

    monkeypatch.setitem(fast_linear._KERNEL, "fn", counting)
    gen = torch.Generator().manual_seed(7)
    x, stream = torch.randint(0, 300, (batch, 48), generator=gen), torch.randint(0, 300, (batch, 96), generator=gen)
    results = {}
    for prepacked in (False, True):
        torch.manual_seed(0)
        model = build_model("hope", "tiny", vocab_size=300)
        model.prepacked_head = prepacked
        made.clear()
        blocked.clear()
        with fast_linear.onednn_products():
            out = model(x, labels=x)
            out.loss.backward()
            train_packs = list(made)
            model.eval()
            with torch.no_grad():
                first = model(stream[:, :40])  # 2 full segments: below the minimum, not reordered
                short_packs = len(made) - len(train_packs)
                second = model(stream[:, 40:], state=first.state)  # 4 segments with the 8 pending tokens
                stream_packs = made[len(train_packs):]
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results[prepacked] = (out.loss.detach(), out.logits.detach(), first.logits, second.logits, *grads)
        if prepacked:
            d = model.dim
            both = [((300, d), 16 * batch, True), ((d, 300), 16 * batch, True)]
            assert train_packs == both and stream_packs == both
            assert short_packs == 0
            # per training segment: logits and softmax @ W (3 segments); per stream segment of the second call: the
            # logits, and softmax @ W for the inner gradient of each full one (4)
            assert sum(blocked) == 3 * 2 + 4 * 2
        else:
            assert made == [] and not any(blocked)
    for a, b in zip(results[False], results[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
