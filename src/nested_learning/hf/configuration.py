"""``NestedLearningConfig``: a ``transformers`` config that names a model of our registry, its size and overrides.

The config holds no architecture of its own: ``model`` and ``size`` pick a builder of
``nested_learning.models.registry`` and ``overrides`` are that builder's keyword arguments (the fields of the model
family's config dataclass), so every registered model -- and every future one -- is a ``transformers`` model
without a second copy of its hyper-parameters. ``config.json`` also carries an ``auto_map`` to two stub modules
written beside it, so tools that load a directory with ``trust_remote_code=True`` and without importing
``nested_learning.hf`` first (``lm_eval --model hf``) find these classes.
"""

from __future__ import annotations

from pathlib import Path

from nested_learning.hf._deps import require_transformers

transformers = require_transformers()

MODEL_TYPE = "nested_learning"
CONFIG_STUB = "configuration_nested_learning"
MODEL_STUB = "modeling_nested_learning"
AUTO_MAP = {"AutoConfig": f"{CONFIG_STUB}.NestedLearningConfig",
            "AutoModelForCausalLM": f"{MODEL_STUB}.NestedLearningForCausalLM"}
_STUBS = {
    CONFIG_STUB: "from nested_learning.hf import NestedLearningConfig\n",
    MODEL_STUB: "from nested_learning.hf import NestedLearningConfig, NestedLearningForCausalLM\n",
}
_HEADER = ('"""Loads the installed nested_learning package (pip install nested-learning-pytorch[hf]); '
           'written by NestedLearningConfig.save_pretrained."""\n\n')


class NestedLearningConfig(transformers.PretrainedConfig):
    """``NestedLearningConfig(model="hope", size="tiny", overrides={"dim": 64})``.

    model: a name of ``nested_learning.models.model_names(include_pretrained=True)``; size: its preset (for
    ``"hopeified"``, the pretrained model's name or directory); overrides: keyword arguments of its builder, JSON
    values (lists stand for tuples). ``vocab_size`` is filled in from the built model by
    ``NestedLearningForCausalLM``.
    """

    model_type = MODEL_TYPE

    def __init__(self, model: str = "hope", size: str = "tiny", overrides: dict | None = None, **kwargs):
        from nested_learning.models import model_names

        known = model_names(include_pretrained=True)
        if not isinstance(model, str) or model.lower().replace("-", "_") not in known:
            raise ValueError(f"NestedLearningConfig: unknown model {model!r}; choose from {known}")
        if not isinstance(size, str):
            raise TypeError(f"NestedLearningConfig: size must be a preset name (str), got {size!r}")
        if overrides is not None and not isinstance(overrides, dict):
            raise TypeError(f"NestedLearningConfig: overrides must be a dict of model settings, got {overrides!r}")
        self.model = model.lower().replace("-", "_")
        self.size = size
        self.overrides = dict(overrides or {})
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        # the models tie their head to their embedding themselves; this lets transformers save and load it once
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``config.json`` plus the two stub modules its ``auto_map`` names."""
        out = super().save_pretrained(save_directory, *args, **kwargs)
        for name, body in _STUBS.items():
            (Path(save_directory) / f"{name}.py").write_text(_HEADER + body)
        return out
