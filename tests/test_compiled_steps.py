"""``memory/compiled_steps.py``: one compiled copy per function and options, and the small-products option."""

import torch

from nested_learning.memory import compiled_steps


def test_one_compiled_copy_per_function_backend_and_small_products(monkeypatch):
    made = []

    def fake_compile(fn, **kwargs):
        made.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(compiled_steps, "_CACHE", {})

    def step(x):
        return x

    for _ in range(2):
        compiled_steps.compiled(step, "inductor")
        compiled_steps.compiled(step, "inductor", small_products=True)
        compiled_steps.compiled(step, "aot_eager", small_products=True)
        compiled_steps.compiled(step, "inductor", small_products=True, cpp_wrapper=True)
        compiled_steps.compiled(step, "inductor", cpp_wrapper=True)
        compiled_steps.compiled(step, "aot_eager", cpp_wrapper=True)
    assert len(made) == 6
    assert all(made[i]["options"] is None for i in (0, 2, 5))  # only inductor takes options
    assert made[1]["options"] == compiled_steps.small_products_options()
    assert made[3]["options"] == {**compiled_steps.small_products_options(), "cpp_wrapper": True}
    assert made[4]["options"] == {"cpp_wrapper": True}


def test_the_cpp_wrapper_where_it_was_measured_faster():
    """Intel CPUs only; there the compiled layer graphs' small chunk inverses are products (no LAPACK call for
    the C++ wrapper to fall back on), elsewhere solves."""
    from nested_learning.memory.self_modifying_titans import SelfModifyingTitans
    from nested_learning.ops import cpu
    from nested_learning.ops.delta_rule_one_chunk import SQUARING_MAX

    assert cpu.cpp_wrapper_pays("GenuineIntel")
    assert not cpu.cpp_wrapper_pays("AuthenticAMD") and not cpu.cpp_wrapper_pays(None)
    assert cpu.cpp_wrapper_default() == cpu.cpp_wrapper_pays(cpu.cpu_vendor())
    assert SelfModifyingTitans.whole_chunk_cpp_wrapper == cpu.cpp_wrapper_default()
    assert SQUARING_MAX == (16 if cpu.cpp_wrapper_default() else 0)


def test_small_products_become_loops_of_inductors_own():
    """Compiled with the option, a batched product of 8 small matrices is no library call in the generated code, one
    of 20 is none only where the bound is 64 (see ``small_products_options``), and both give the eager values; the
    pass's CPU bounds are raised as the option says."""
    from torch._inductor.fx_passes import decompose_mem_bound_mm
    from torch._inductor.utils import run_and_get_code

    def product(a, b):
        return torch.bmm(a, b).relu()

    bound = compiled_steps._SMALL_PRODUCTS["cpu_max_first_dimension_decomposition"]
    for batch, loop in ((8, True), (20, bound >= 20)):
        a, b = torch.randn(batch, 16, 8), torch.randn(batch, 8, 12)
        with torch._inductor.config.patch(fx_graph_cache=False):  # generate the code, so that it can be read
            torch._dynamo.reset()
            out, code = run_and_get_code(compiled_steps.compiled(product, "inductor", small_products=True), a, b)
        assert ("extern_kernels.bmm" not in "\n".join(code)) == loop, batch
        torch.testing.assert_close(out, torch.bmm(a, b).relu())
    assert decompose_mem_bound_mm.cpu_max_first_dimension_decomposition >= bound


def test_the_batch_bound_follows_the_cpus_matmul_library():
    assert compiled_steps.small_products_bounds(True)["cpu_max_first_dimension_decomposition"] == 64
    assert compiled_steps.small_products_bounds(False)["cpu_max_first_dimension_decomposition"] == 8
    from nested_learning.ops.cpu import mkl_generic_path

    assert compiled_steps._SMALL_PRODUCTS == compiled_steps.small_products_bounds(mkl_generic_path())


def test_a_function_without_autograd_compiles_once_whatever_its_inputs_require(monkeypatch):
    """``compiled_values`` passes the tensors that require gradients detached (inside tuples too): inputs that do or
    do not require gradients, as a stream's first chunk and its later ones give them, take one graph; ``compiled``
    would build one per pattern."""
    monkeypatch.setattr(compiled_steps, "_CACHE", {})
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(x, pair):
        return x * pair[0] + pair[1]

    torch._dynamo.reset()
    fresh, trained = torch.ones(3), torch.ones(3, requires_grad=True)
    values = compiled_steps.compiled_values(step, counting)
    with torch.no_grad():
        for w in (fresh, trained, fresh):
            out = values(torch.arange(3.0), (w, trained))
            torch.testing.assert_close(out, torch.arange(3.0) + 1)
    assert len(graphs) == 1
    torch._dynamo.reset()
    plain = compiled_steps.compiled(step, counting)
    with torch.no_grad():
        for w in (fresh, trained):
            plain(torch.arange(3.0), (w, trained))
    assert len(graphs) == 3
