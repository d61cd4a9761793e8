"""The fused tied head: its gradients equal plain autograd through ``F.cross_entropy(h @ W^T)``."""

import pytest
import torch
import torch.nn.functional as F

from nested_learning.models.tied_head import SegmentedHead, TiedHead, softmax_into


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
