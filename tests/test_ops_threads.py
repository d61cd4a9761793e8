"""The thread policy for stretches of small ops: one thread only when OpenMP's idle threads sleep, the caller's
threads back for a large op inside, the count restored on the way out (errors included)."""

import pytest
import torch

from nested_learning.ops.threads import BackwardOnOneThread, caller_threads, one_thread_if_threads_sleep


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
    monkeypatch.setattr(
        m.blocks[0].cms, "read", lambda *a, **k: seen["read"].add(torch.get_num_threads()) or read(*a, **k)
    )
    m(torch.randint(0, 40, (1, 12)), labels=torch.randint(0, 40, (1, 12))).loss.backward()
    assert seen == {"head": {2}, "read": {1}} and torch.get_num_threads() == 2


def test_a_cms_language_models_backward_runs_on_one_thread_and_its_heads_products_on_the_callers(
    monkeypatch, two_threads
):
    from nested_learning.models import HOPE
    from nested_learning.models.tied_head import TiedHead

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    seen = {"head": set(), "read": set()}
    head_backward = TiedHead._backward

    def recording_head_backward(*args):
        seen["head"].add(torch.get_num_threads())
        return head_backward(*args)

    monkeypatch.setattr(TiedHead, "_backward", staticmethod(recording_head_backward))
    torch.manual_seed(0)
    m = HOPE(vocab_size=40, dim=16, n_layers=1, n_heads=2, chunk_sizes=(4, 8))
    read = m.blocks[0].cms.read

    def recording_read(*a, **k):
        y, cache = read(*a, **k)
        if y.requires_grad:
            y.register_hook(lambda g: seen["read"].add(torch.get_num_threads()))
        return y, cache

    monkeypatch.setattr(m.blocks[0].cms, "read", recording_read)
    ids = torch.randint(0, 40, (1, 12))
    m(ids, labels=ids).loss.backward()
    # the hook fires in the inner gradients' pass (the forward's segment loop) and in the outer backward
    assert seen == {"head": {2}, "read": {1}} and torch.get_num_threads() == 2


def _probe(t: torch.Tensor, seen: list, name: str) -> torch.Tensor:
    t.register_hook(lambda g: seen.append((name, torch.get_num_threads())))
    return t


@pytest.mark.parametrize("policy", ["PASSIVE", "ACTIVE"])
def test_a_backward_span_runs_on_one_thread_between_outputs_and_inputs(monkeypatch, two_threads, policy):
    monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    one = 1 if policy == "PASSIVE" else 2
    seen = []
    x = torch.randn(3, 4, requires_grad=True)
    below = _probe(x * 1.5, seen, "below")  # an op before the layer: back on the caller's threads
    span = BackwardOnOneThread(below)
    inside = _probe(span.input(below) * 2, seen, "inside")
    y, total = span.outputs(inside, inside.sum())
    if policy != "PASSIVE":
        assert y is inside  # untouched
    above = _probe(y * 1.0, seen, "above")  # an op after the layer: before the switch
    inside.register_hook(lambda g: seen.append(("caller", _count_under_caller_threads())))
    (total + above.sum()).backward(retain_graph=True)
    assert seen == [("above", 2), ("inside", one), ("caller", 2), ("below", 2)] and torch.get_num_threads() == 2
    assert torch.equal(x.grad, torch.full_like(x, 6.0))
    seen.clear()
    total.backward()  # a second pass through the same graph switches again; the end of the pass restores
    assert seen == [("inside", one), ("caller", 2), ("below", 2)] and torch.get_num_threads() == 2


def _count_under_caller_threads():
    with caller_threads():
        return torch.get_num_threads()


def test_a_span_without_an_input_node_is_restored_when_the_pass_ends(monkeypatch, two_threads):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    seen = []
    x = torch.randn(3, requires_grad=True)
    span = BackwardOnOneThread(x)
    (loss,) = span.outputs(_probe(x * 2, seen, "inside").sum())  # x not passed through span.input
    loss.backward()
    assert seen == [("inside", 1)] and torch.get_num_threads() == 2
    with caller_threads():  # nothing left behind
        assert torch.get_num_threads() == 2


def test_a_span_inside_another_ones_stretch_changes_nothing(monkeypatch, two_threads):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    seen = []
    x = torch.randn(3, requires_grad=True)
    outer = BackwardOnOneThread(x)
    inner = BackwardOnOneThread(x)
    h = _probe(inner.output(inner.input(x) * 2), seen, "between")  # the inner span's input restores nothing
    (loss,) = outer.outputs(_probe(h * 3, seen, "top").sum())
    loss.backward()
    assert seen == [("top", 1), ("between", 1)] and torch.get_num_threads() == 2


def test_grad_free_and_one_thread_calls_pass_untouched(monkeypatch, two_threads):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    y = torch.randn(3)
    assert BackwardOnOneThread(y).output(y) is y  # nothing to differentiate
    with torch.no_grad():
        x = torch.randn(3, requires_grad=True)
        assert BackwardOnOneThread(x).output(x) is x
    torch.set_num_threads(1)
    x = torch.randn(3, requires_grad=True)
    assert BackwardOnOneThread(x).output(x) is x
    assert two_threads == [1]


def test_a_failed_backward_leaves_one_thread_until_the_next_span_restores_it(monkeypatch, two_threads):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    x = torch.randn(3, requires_grad=True)
    y = x * 2
    y.register_hook(lambda g: (_ for _ in ()).throw(RuntimeError("inside the backward")))
    (loss,) = BackwardOnOneThread(x).outputs(y.sum())
    with pytest.raises(RuntimeError, match="inside the backward"):
        loss.backward()
    assert torch.get_num_threads() == 1  # the end-of-pass callback never ran
    BackwardOnOneThread(x)  # the next layer or model call
    assert torch.get_num_threads() == 2
    with caller_threads():  # nothing left behind
        assert torch.get_num_threads() == 2


@pytest.mark.parametrize("layer", ["cms", "self_modifying_titans"])
def test_the_sequence_layers_run_their_loops_forward_and_backward_on_one_thread(monkeypatch, two_threads, layer):
    from nested_learning.memory import ContinuumMemorySystem, SelfModifyingTitans

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    torch.manual_seed(0)
    m = ContinuumMemorySystem(8, chunk_sizes=(2, 4)) if layer == "cms" else SelfModifyingTitans(8, n_heads=2, chunk_size=4)
    seen = {"forward": set(), "backward": set()}
    name = "read" if layer == "cms" else "_fused_step"  # called inside the loop, once per segment or chunk
    inside_the_loop = getattr(m, name)

    def recording(*a, **kw):
        out = inside_the_loop(*a, **kw)
        seen["forward"].add(torch.get_num_threads())
        out[0].register_hook(lambda g: seen["backward"].add(torch.get_num_threads()))
        return out

    monkeypatch.setattr(m, name, recording)
    x = torch.randn(1, 8, 8, requires_grad=True)
    y, _ = m(x)
    assert torch.get_num_threads() == 2
    y.square().sum().backward()
    assert seen == {"forward": {1}, "backward": {1}} and torch.get_num_threads() == 2
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("policy, n, threads, parts", [
    ("PASSIVE", 8, 2, 2), ("PASSIVE", 1, 2, 1), ("PASSIVE", 8, 1, 1), ("ACTIVE", 8, 2, 1), (None, 8, 2, 1),
])
def test_side_by_side_parts_only_when_threads_sleep(monkeypatch, policy, n, threads, parts):
    from nested_learning.ops.threads import side_by_side_parts

    if policy is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert side_by_side_parts(torch.device("cpu"), n) == parts
    assert side_by_side_parts(torch.device("meta"), n) == 1


def test_run_side_by_side_runs_the_parts_on_threads_of_one_torch_thread_without_grad(monkeypatch):
    import threading

    from nested_learning.ops import threads

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")

    def part(i):
        return i, threading.current_thread().name, torch.get_num_threads(), torch.is_grad_enabled()

    before = torch.get_num_threads()
    out = threads.run_side_by_side(part, [(0,), (1,), (2,)])
    assert [o[0] for o in out] == [0, 1, 2]
    assert out[0][1] == threading.current_thread().name
    assert all(o[1].startswith("nested-learning-part") for o in out[1:])
    assert all(o[2] == 1 and not o[3] for o in out)
    assert torch.get_num_threads() == before
    monkeypatch.setattr(threads.os, "getpid", lambda: -1)  # as in a forked child: the parent's workers are gone
    old = threads._POOL["executor"]
    assert [o[0] for o in threads.run_side_by_side(part, [(5,), (6,)])] == [5, 6]
    assert threads._POOL["executor"] is not old


@pytest.mark.parametrize("failing", [0, 1])
def test_run_side_by_side_raises_a_parts_error_after_every_part_ended(failing):
    import time

    from nested_learning.ops.threads import run_side_by_side

    done = []

    def part(i):
        if i == failing:
            raise ValueError(f"part {i}")
        time.sleep(0.05)
        done.append(i)

    with pytest.raises(ValueError, match=f"part {failing}"):
        run_side_by_side(part, [(0,), (1,)])
    assert done == [1 - failing]


def test_a_worker_keeps_one_torch_thread_when_the_caller_sets_its_count_again(monkeypatch):
    """ATen gives a thread the process-wide thread count at its first use; a worker made before the caller set its
    count again (as every one-thread stretch does when it ends) still runs its parts on one torch thread."""
    from nested_learning.ops import threads

    monkeypatch.setitem(threads._POOL, "executor", None)
    before = torch.get_num_threads()
    pool = threads._worker_pool(1)
    try:
        pool.submit(lambda: None).result()  # the worker starts (its initializer runs) without a torch op
        torch.set_num_threads(2)
        assert pool.submit(torch.get_num_threads).result() == 1
    finally:
        torch.set_num_threads(before)
        pool.shutdown()
