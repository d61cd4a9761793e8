"""Models by name and size, as the trainer, the CLI and the experiment scripts ask for them."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch.nn as nn

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


_FROM_PRETRAINED: set[str] = set()


def register_model(name: str, from_pretrained: bool = False):
    """Register a builder ``fn(size, **overrides)``. ``from_pretrained``: ``size`` names a pretrained checkpoint;
    such models are built by name but left out of :func:`model_names` (the suites that train every model from
    scratch skip them)."""

    def deco(fn):
        _BUILDERS[name] = fn
        if from_pretrained:
            _FROM_PRETRAINED.add(name)
        return fn

    return deco


def model_names(include_pretrained: bool = False) -> list[str]:
    return sorted(n for n in _BUILDERS if include_pretrained or n not in _FROM_PRETRAINED)


def build_model(name: str, size: str = "tiny", **overrides) -> nn.Module:
    """``build_model("transformer", "tiny", dim=64)``; unknown names raise ``ValueError`` listing the valid ones."""
    key = name.lower().replace("-", "_")
    if key not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose from {model_names(include_pretrained=True)}")
    try:
        return _BUILDERS[key](size, **overrides)
    except TypeError as err:  # dataclasses.replace(config, foo=1): name the setting, not the dataclass internals
        match = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if match is None:
            raise
        raise TypeError(
            f"model {name!r} has no setting {match.group(1)!r} (model_overrides {overrides}); "
            f"see the fields of its config dataclass"
        ) from err


@register_model("transformer")
def _transformer(size: str, **overrides):
    from nested_learning.models.transformer import TransformerPP

    return TransformerPP.from_preset(size, **overrides)


@register_model("titans")
def _titans(size: str, **overrides):
    from nested_learning.models.recurrent_lms import build_titans

    return build_titans(size, **overrides)


@register_model("deltanet")
def _deltanet(size: str, **overrides):
    from nested_learning.models.recurrent_lms import build_deltanet

    return build_deltanet(size, **overrides)


@register_model("hope")
def _hope(size: str, **overrides):
    from nested_learning.models.hope import HOPE

    return HOPE.from_preset(size, **overrides)


@register_model("hope_attention")
def _hope_attention(size: str, **overrides):
    from nested_learning.models.hope_attention import HOPEAttention

    return HOPEAttention.from_preset(size, **overrides)


@register_model("hopeified", from_pretrained=True)
def _hopeified(size: str, **overrides):
    """``size``: a pretrained model's name (``"smollm2-135m"``) or checkpoint directory; overrides: hopeify's."""
    from nested_learning.models.pretrained import hopeify, load_pretrained

    model, tok = load_pretrained(size)
    return hopeify(model, tokenizer=tok, copy_model=False, **overrides)
