"""Checks of a stream state passed back to a model, so that a state from another model, another batch size or a
cast to another dtype is a clear error at the call instead of a shape error deep inside a memory (or, for a dtype,
silently kept).

The expected layout comes from fresh states at batch sizes 1 and 2: a tensor dimension that differs between them
is a batch dimension (its size per batch element is the size at batch 1; e.g. Titans' weights are ``(B * H, ...)``),
a dimension of size 0 in the fresh state grows with the stream (pending tokens, a KV cache) and is not checked, and
every other dimension and every dtype must match exactly.
"""

from __future__ import annotations

import dataclasses

import torch

from nested_learning.memory.state import LayerState


def leaves(value, prefix: str = "") -> dict[str, object]:
    """``{dotted.name: tensor | int}`` of a state, without copying any tensor."""
    out: dict[str, object] = {}
    if isinstance(value, torch.Tensor) or isinstance(value, int):
        out[prefix] = value
    elif isinstance(value, LayerState):
        for f in dataclasses.fields(value):
            out.update(leaves(getattr(value, f.name), f"{prefix}.{f.name}" if prefix else f.name))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            out.update(leaves(v, f"{prefix}.{i}"))
    return out


def signature(one: LayerState, two: LayerState) -> dict[str, tuple]:
    """From fresh states at batch 1 and 2: ``{name: (type, shape, dtype, batch_dim)}`` (batch_dim None if none)."""
    a, b = leaves(one), leaves(two)
    sig = {}
    for name, x in a.items():
        if isinstance(x, torch.Tensor):
            y = b[name]
            dims = [i for i, (m, n) in enumerate(zip(x.shape, y.shape)) if m != n]
            sig[name] = (type(one), tuple(x.shape), x.dtype, dims[0] if dims else None)
        else:
            sig[name] = (type(one), None, None, None)
    return sig


def check_state(state, sig: dict[str, tuple], batch: int, owner: str) -> None:
    """Raise ``TypeError`` / ``ValueError`` naming the first field of ``state`` that does not fit ``sig``."""
    expected_type = next(iter(sig.values()))[0] if sig else None
    if expected_type is not None and not isinstance(state, expected_type):
        raise TypeError(
            f"state must be a {expected_type.__name__} returned by this {owner} (or None), got {type(state).__name__}"
        )
    got = leaves(state)
    if set(got) != set(sig):
        missing, extra = sorted(set(sig) - set(got)), sorted(set(got) - set(sig))
        raise ValueError(
            f"state does not fit this {owner} (another configuration?): missing {missing[:4]}, unexpected {extra[:4]}"
        )
    for name, (_, shape, dtype, bdim) in sig.items():
        x = got[name]
        if shape is None:
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"state field {name!r} must be a tensor, got {type(x).__name__}")
        if x.dtype != dtype:
            raise TypeError(
                f"state field {name!r} has dtype {x.dtype}, this {owner} keeps it in {dtype}; pass the state as "
                "returned (state.to(device) moves it without casting)"
            )
        if x.dim() != len(shape):
            raise ValueError(f"state field {name!r} has shape {tuple(x.shape)}, expected {len(shape)} dimensions")
        for i, (n, m) in enumerate(zip(x.shape, shape)):
            if i == bdim:
                if n != m * batch:
                    raise ValueError(
                        f"state field {name!r} was made for batch size {n // max(m, 1)}, but input_ids has batch "
                        f"size {batch}"
                    )
            elif m and n != m:
                raise ValueError(
                    f"state field {name!r} has shape {tuple(x.shape)}, this {owner} expects {shape} at dimension "
                    f"{i} (a state of another model size?)"
                )


def model_state_signature(model, device, dtype_key) -> dict[str, tuple]:
    """The signature of ``model.initial_state``, cached on the model per (device, dtype)."""
    cache = model.__dict__.setdefault("_state_signature_cache", {})
    key = (str(device), dtype_key)
    if key not in cache:
        with torch.no_grad():
            cache[key] = signature(model.initial_state(1, device=device), model.initial_state(2, device=device))
    return cache[key]


def check_cms_lm_call(model, state, input_ids: torch.Tensor) -> None:
    """The checks of a HOPE / HOPE-attention call that its forward would otherwise fail on obscurely."""
    if torch.is_inference_mode_enabled() and model.test_time_updates:
        raise RuntimeError(
            f"{type(model).__name__} learns at test time through autograd (the CMS levels' inner gradients), which "
            "torch.inference_mode() disables: use torch.no_grad() instead, or model.set_test_time_updates(False)"
        )
    if state is not None:
        dtype = model.embed.weight.dtype
        check_state(state, model_state_signature(model, input_ids.device, dtype), input_ids.shape[0],
                    type(model).__name__)
