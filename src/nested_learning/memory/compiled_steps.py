"""``torch.compile`` of a memory layer's chunk step, shared by the layers that offer ``compile_chunk_step``: one
compiled copy per step function and backend, and the warning a layer gives before it falls back to the eager step."""

from __future__ import annotations

import warnings

import torch

from ..ops.cpu import mkl_generic_path

_CACHE: dict = {}
_FAILED: set = set()  # (function, backend) pairs whose compilation failed: run eagerly from then on


def small_products_bounds(generic_mkl: bool) -> dict:
    """inductor's CPU bounds for turning a batched product into a multiply and a sum it generates a loop for (batch
    size; the other dimensions of a 2-D product): the batch bound depends on whether PyTorch's product is MKL's
    generic path (see :func:`small_products_options`). The pass leaves every product alone unless switched on."""
    return {"cpu_max_first_dimension_decomposition": 64 if generic_mkl else 8,
            "cpu_max_other_dimension_decomposition": 2048}


_SMALL_PRODUCTS = small_products_bounds(mkl_generic_path())


def small_products_options() -> dict | None:
    """inductor options under which the products of a few small matrices (and 2-D products of a few rows) become
    loops of inductor's own, fused with their neighbours, instead of one library call each; None where this torch has
    no such pass. At the self-modifying Titans' sizes (16-token chunks, 32-wide heads) a library call costs 10-40 us
    for a few hundred thousand FLOPs.

    How few: at most 64 matrices where PyTorch's product is MKL's generic path (an AMD EPYC: HOPE tiny's compiled
    training step 1.02-1.07x against one library call per product, at 1 and 2 threads and either OpenMP wait policy),
    at most 8 elsewhere. On an Intel Xeon, where MKL takes its own fast path, the products of more matrices ran faster
    as library calls: with the bound at 64 the step ran 0.92-0.96x the bound-8 step at
    1 thread, 0.93-0.98x with 2 threads and passive waiting, 0.96-0.98x active (T = 512, separate processes taken in
    turn; bounds 4 and 8 ran alike), and the bound-8 step ran 0.98-1.01x the one without loops
    (``benchmarks/bench_hope_chunk_step.py`` at 1 and 2 threads).

    The pass reads its CPU bounds from module constants set at import time, so they are set here as well (they only
    act while the pass is switched on, which these options do); the same values go into the options, and so into
    the compiled-graph cache's key."""
    try:
        from torch._inductor.fx_passes import decompose_mem_bound_mm as small_products_pass
    except ImportError:
        return None
    for name, value in _SMALL_PRODUCTS.items():
        if not hasattr(small_products_pass, name):
            return None
        setattr(small_products_pass, name, max(getattr(small_products_pass, name), value))
    return {"post_grad_fusion_options": {"decompose_mm_pass": dict(_SMALL_PRODUCTS)}}


def compiled(step, backend: str, small_products: bool = False, cpp_wrapper: bool = False):
    """``step`` under ``torch.compile`` (static shapes, one graph), created once per function, backend,
    ``small_products`` (with inductor: ``small_products_options``) and ``cpp_wrapper`` (with inductor: its C++
    wrapper, ``ops.cpu.cpp_wrapper_pays``)."""
    key = (step, backend, small_products, cpp_wrapper)
    if key not in _CACHE:
        options = {}
        if backend == "inductor":
            if small_products:
                options.update(small_products_options() or {})
            if cpp_wrapper:
                options["cpp_wrapper"] = True
        _CACHE[key] = torch.compile(step, backend=backend, dynamic=False, fullgraph=True, options=options or None)
    return _CACHE[key]


def _detached(x):
    """Tensors that require gradients detached, inside tuples and lists too; anything else as it is."""
    if isinstance(x, torch.Tensor):
        return x.detach() if x.requires_grad else x
    if type(x) in (tuple, list):
        return type(x)(_detached(t) for t in x)
    return x


def compiled_values(step, backend: str):
    """``compiled(step, backend)`` for a function computed without autograd (a hand-written forward or backward):
    its tensors are passed detached, since the compiler guards on each input's ``requires_grad`` and would
    otherwise build one graph per pattern a stream goes through (a fresh memory's momentum needs no gradient,
    later ones do), though the arithmetic is the same."""
    fn = compiled(step, backend)
    return lambda *args: fn(*_detached(args))


def warn_eager_fallback(what: str, backend: str, err: Exception, stacklevel: int) -> None:
    """Say that compiling ``what`` failed (e.g. no C compiler for inductor) and that it runs eagerly instead."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
    warnings.warn(
        f"compiling the {what} with backend {backend!r} failed ({type(err).__name__}: {reason}); running it eagerly",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )


def call_compiled_or_eager(fn, backend: str | None, what: str, *args):
    """``fn(*args)`` compiled with ``backend`` (None: eagerly) as a function without autograd
    (:func:`compiled_values`); if compiling fails, warn once and run it eagerly, then and on every later call. For
    steps whose compilation happens where no caller can catch it (a backward)."""
    if backend is None or (fn, backend) in _FAILED:
        return fn(*args)
    try:
        return compiled_values(fn, backend)(*args)
    except Exception as err:  # e.g. no C compiler for inductor: the eager function computes the same thing
        _FAILED.add((fn, backend))
        warn_eager_fallback(what, backend, err, stacklevel=2)
        return fn(*args)
