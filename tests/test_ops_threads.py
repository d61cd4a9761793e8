"""The thread policy for stretches of small ops: one thread only when OpenMP's idle threads sleep, the caller's
threads back for a large op inside, the count restored on the way out (errors included)."""

import pytest
import torch

from nested_learning.ops.threads import caller_threads, one_thread_if_threads_sleep


@pytest.fixture
def two_threads(monkeypatch):
    """A 2-thread count that the policy can change, whatever this machine has; records every change."""
    count, calls = [2], []
    monkeypatch.setattr(torch, "set_num_threads", lambda m: calls.append(m) or count.__setitem__(0, m))
    monkeypatch.setattr(torch, "get_num_threads", lambda: count[0])
    return calls


@pytest.mark.parametrize("policy, inside", [("PASSIVE", 1), ("ACTIVE", 2), (None, 2)])
def test_one_thread_stretch_and_the_callers_threads_inside(monkeypatch, two_threads, policy, inside):
    if policy is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    cpu = torch.device("cpu")
    with one_thread_if_threads_sleep(cpu):
        assert torch.get_num_threads() == inside
        with one_thread_if_threads_sleep(cpu):  # nested: nothing more to do
            assert torch.get_num_threads() == inside
        with caller_threads():
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == inside
    assert torch.get_num_threads() == 2
    with caller_threads():  # outside a stretch it changes nothing
        assert torch.get_num_threads() == 2
    assert two_threads == ([1, 2, 1, 2] if inside == 1 else [])


def test_an_error_inside_restores_the_count(monkeypatch, two_threads):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    with pytest.raises(RuntimeError):
        with one_thread_if_threads_sleep(torch.device("cpu")):
            with caller_threads():
                raise RuntimeError("inside")
    assert torch.get_num_threads() == 2
    with caller_threads():  # the stretch is over: no caller count left behind
        assert torch.get_num_threads() == 2
    assert two_threads == [1, 2, 1, 2]


def test_a_cms_language_model_runs_its_segments_on_one_thread_and_its_head_on_the_callers(monkeypatch, two_threads):
    from nested_learning.models import HOPEAttention
    from nested_learning.models.tied_head import SegmentedHead

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    seen = {"head": set(), "read": set()}
    segment = SegmentedHead._segment

    def head_segment(self, *args):
        seen["head"].add(torch.get_num_threads())
        return segment(self, *args)

    monkeypatch.setattr(SegmentedHead, "_segment", head_segment)
    torch.manual_seed(0)
    m = HOPEAttention(vocab_size=40, dim=16, n_layers=1, n_heads=2, chunk_sizes=(4, 8))
    read = m.blocks[0].cms.read
    monkeypatch.setattr(m.blocks[0].cms, "read", lambda *a: seen["read"].add(torch.get_num_threads()) or read(*a))
    m(torch.randint(0, 40, (1, 12)), labels=torch.randint(0, 40, (1, 12))).loss.backward()
    assert seen == {"head": {2}, "read": {1}} and torch.get_num_threads() == 2
