"""``x @ w.T`` for the large products with a language model's head, through oneDNN on CPUs where PyTorch's own
product is slow.

PyTorch's fp32 ``mm`` on CPU calls MKL, which takes its generic code path on x86 CPUs of vendors other than Intel:
on an AMD EPYC machine a 1024 x 1024 fp32 product ran at ~105 GFLOP/s per core through ``torch.mm`` and ~235
through oneDNN (``torch.ops.mkldnn._linear_pointwise``, the kernel inductor uses for linear layers), whose kernels
use the CPU's AVX-512 units. The gap was widest for the head's products: one 16-token segment's logits
(16 x 128 by 128 x 32000) took 1.7 ms against 0.7 ms at two threads, ``softmax @ W`` 1.2 against 0.4 ms, the head's
weight gradient over 512 tokens 25 against 10 ms. On an Intel Xeon MKL takes its own fast path and oneDNN gained
nothing (the 1024 x 1024 product 275-297 against 267-273 GFLOP/s at two threads, training steps 0.94-1.00x; a
16-row weight gradient 0.7 against 4.9 ms), so by default the products go through oneDNN only where MKL is
PyTorch's library and the CPU is an x86 one not made by Intel (:func:`onednn_preferred`, ``ops/cpu.py``). The
results equal ``torch.mm``'s to rounding (fp32 sums in another order; tests).

:func:`linear` is the product without autograd, :func:`head_linear` the same with autograd (its backward's two
products through oneDNN as well; under ``create_graph`` plain differentiable products), :func:`linear_layer` a
bias-free ``nn.Linear`` through :func:`head_linear` over enough rows (the projections over a whole call of the Titans
neural memory: 1.02-1.04x its eager training step at T=512-8192, 1.00-1.01x with its chunk step compiled; of the
Transformer++'s attention and MLP: 1.02x / 1.05x its step at T=512 / 2048; 2 threads passive, alternating in one
process, on the AMD machine; and of the DeltaNet and linear-attention layers). All take PyTorch's own product where
oneDNN is not preferred, off CPU, for dtypes other than fp32, under autocast, while ``torch.compile`` traces (the
compiler chooses its own kernels), for tensor subclasses (e.g. FSDP's DTensor), where this PyTorch has no oneDNN,
and inside :func:`library_products`; :func:`onednn_products` takes oneDNN wherever it applies (both for
comparisons).
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.nn.functional as F

from .cpu import mkl_generic_path

_FORCED: list = []  # the innermost library_products() / onednn_products(): False / True


@contextlib.contextmanager
def _forced(use_onednn: bool):
    _FORCED.append(use_onednn)
    try:
        yield
    finally:
        _FORCED.pop()


def library_products():
    """Within it, :func:`linear` and :func:`head_linear` use PyTorch's own product (for comparisons)."""
    return _forced(False)


def onednn_products():
    """Within it, :func:`linear` and :func:`head_linear` use oneDNN's kernel wherever it applies, whatever the CPU
    (for comparisons)."""
    return _forced(True)


def onednn_preferred() -> bool:
    """Whether :func:`linear` takes oneDNN's kernel by default here: PyTorch's product is MKL's, on an x86 CPU of
    another vendor than Intel (``ops.cpu.mkl_generic_path``; see the module docstring)."""
    return mkl_generic_path()


def _wanted() -> bool:
    return _FORCED[-1] if _FORCED else onednn_preferred()


def _onednn_kernel():
    mkldnn = getattr(torch.ops, "mkldnn", None)
    try:
        return mkldnn._linear_pointwise if mkldnn is not None and torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):  # a build without the op
        return None


_KERNEL = {"fn": None}  # set at import (below); None once a call of it has failed


def _kernel():
    return _KERNEL["fn"]


def _count_its_flops(op) -> None:
    """Teach ``torch.utils.flop_counter`` the kernel's FLOPs (2 M N K), which it does not know: without this a
    ``FlopCounterMode`` (and every FLOP/s figure built on it) would miss the head's products."""
    from torch.utils import flop_counter

    def flops(x_shape, second, third=None, *args, out_shape=None, **kwargs) -> int:
        # (x, w, bias, ...) or, the "binary" overload, (x, other, w, bias, ...): w is the 2-D shape after x and other
        w_shape = third if isinstance(third, (tuple, list)) and len(third) == 2 else second
        rows = math.prod(x_shape[:-1])
        return 2 * rows * x_shape[-1] * w_shape[0]

    try:
        if op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op)(flops)
    except (AttributeError, TypeError, ValueError):  # a torch whose counter works otherwise: only counts miss it
        pass


def onednn_applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether :func:`linear` takes oneDNN's kernel for these operands (2-D, fp32, plain CPU tensors) on this CPU
    (:func:`onednn_preferred`, or inside :func:`onednn_products`)."""
    return (
        _wanted()
        and x.device.type == "cpu"
        and w.device.type == "cpu"
        and x.dtype == torch.float32
        and w.dtype == torch.float32
        and x.dim() == 2
        and w.dim() == 2
        and x.numel() > 0
        and w.numel() > 0
        and type(x) in (torch.Tensor, torch.nn.Parameter)
        and type(w) in (torch.Tensor, torch.nn.Parameter)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and _kernel() is not None
    )


def _identity(w: torch.Tensor) -> tuple:
    # in-place changes (an optimizer's step, load_state_dict's copy) bump the version counter, which views and
    # detached aliases share with the parameter; a new .data changes the address
    return (w.data_ptr(), tuple(w.shape), w.stride(), w._version)


def _reorder_op():
    mkldnn = getattr(torch.ops, "mkldnn", None)
    try:
        return mkldnn._reorder_linear_weight if mkldnn is not None else None
    except (AttributeError, RuntimeError):  # a build without the op
        return None


class Prepacked:
    """A weight ``w: (N, K)`` reordered once into oneDNN's blocked layout for products ``x @ w.T`` of about
    ``rows`` rows (:func:`prepack`). :func:`linear` takes it for ``w`` only while ``w`` is the same tensor,
    unchanged (address, shape, strides and version counter as when it was made); otherwise it takes ``w`` as it is.

    Why: without it oneDNN reorders the weight on every call. The HOPE segment head's two products with the tied
    weight ((16 x 128) by (128 x 32000) and (16 x 32000) by (32000 x 128)) run 32 times in a 512-token call, each
    streaming 16 MB; reordered once per call, HOPE tiny's training step ran 1.02-1.08x faster at T=512 and
    1.04-1.07x at T=2048 on the AMD EPYC machine (docs/results/bench_head_products.md)."""

    __slots__ = ("blocked", "_source")

    def __init__(self, blocked: torch.Tensor, source: tuple):
        self.blocked, self._source = blocked, source

    def fits(self, w: torch.Tensor) -> bool:
        """Whether this is ``w``'s reordered copy, ``w`` unchanged since."""
        return not w.is_inference() and _identity(w) == self._source


def prepack(w: torch.Tensor, rows: int) -> Prepacked | None:
    """``w: (N, K)`` reordered for products of about ``rows`` rows, for :func:`linear`'s ``packed``; None where
    :func:`linear` would not take oneDNN's kernel for such products, or this PyTorch cannot reorder. Costs about a
    copy of ``w`` (more for a transposed view, which is copied first), so it pays where ``w`` meets many products."""
    reorder = _reorder_op()
    # an inference tensor has no version counter to tell an in-place change by
    if reorder is None or rows < 1 or w.is_inference() or not onednn_applies(w.new_empty(rows, w.shape[-1]), w):
        return None
    source = _identity(w)
    try:
        with torch.no_grad():
            return Prepacked(reorder(w.detach().contiguous(), rows), source)
    except RuntimeError:  # this oneDNN cannot reorder it: linear takes w as it is
        return None


def linear(x: torch.Tensor, w: torch.Tensor, packed: Prepacked | None = None) -> torch.Tensor:
    """``x @ w.T`` for ``x: (M, K)``, ``w: (N, K)``, any strides, without autograd: oneDNN's kernel where it applies
    (``onednn_applies``), else ``torch.mm``. ``packed``: ``w`` reordered by :func:`prepack`, used while it
    :meth:`~Prepacked.fits` ``w``. The reference is ``x @ w.T``, which it equals to rounding."""
    if onednn_applies(x, w):
        weight = packed.blocked if packed is not None and packed.fits(w) else w.detach()
        try:
            with torch.no_grad():
                return _kernel()(x.detach(), weight, None, "none", [], "")
        except RuntimeError as err:  # a build whose oneDNN cannot run here: PyTorch's product from now on
            _KERNEL["fn"] = None
            warnings.warn(f"oneDNN's linear kernel failed ({err}); using torch.mm", RuntimeWarning, stacklevel=2)
    return x @ w.t()


def _weight_grad(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``g.T @ x`` ((N, M) by (M, K)) as ``(x.T @ g).T``: oneDNN reads both transposed operands as stored and
    writes (K, N); one transposing copy gives the (N, K) gradient (the product with ``g.T`` as its left operand
    ran about 5x slower there)."""
    return linear(x.t(), g.t()).t().contiguous()


class _HeadLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return linear(x, w)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g = g.contiguous()  # e.g. a sum's expanded gradient: oneDNN reads dense operands
        if torch.is_grad_enabled():  # create_graph: differentiable products
            return (g @ w if ctx.needs_input_grad[0] else None, g.t() @ x if ctx.needs_input_grad[1] else None)
        dx = linear(g, w.t()) if ctx.needs_input_grad[0] else None
        dw = _weight_grad(x, g) if ctx.needs_input_grad[1] else None
        return dx, dw


def head_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w)`` (no bias) for ``x: (..., K)``, ``w: (N, K)`` with autograd, its forward and backward
    products through :func:`linear` where oneDNN applies, else ``F.linear`` itself."""
    flat = x.reshape(-1, x.shape[-1])
    if not onednn_applies(flat, w):
        return F.linear(x, w)
    return _HeadLinear.apply(flat, w).view(*x.shape[:-1], w.shape[0])


# Rows below which a layer's product stays PyTorch's own: the memories' small products (64 rows or fewer) ran no
# faster through oneDNN, and the autograd function's Python costs more than it saves there.
MIN_LAYER_ROWS = 65


def linear_layer(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for a layer applied to ``x: (..., K)``: through :func:`head_linear` when it is a plain
    ``nn.Linear`` without bias and ``x`` has at least ``MIN_LAYER_ROWS`` rows, else the layer's own call (a replaced
    or subclassed layer runs as it is)."""
    plain = type(layer) is torch.nn.Linear and layer.bias is None
    if plain and x.numel() >= MIN_LAYER_ROWS * x.shape[-1]:
        return head_linear(x, layer.weight)
    return layer(x)


# looked up at import, so that its FLOP formula is registered before any FlopCounterMode copies the registry
_KERNEL["fn"] = _onednn_kernel()
if _KERNEL["fn"] is not None:
    _count_its_flops(_KERNEL["fn"])
