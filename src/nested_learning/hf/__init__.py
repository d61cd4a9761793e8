"""Hugging Face ``transformers`` integration: every model of the registry as an ``AutoModelForCausalLM``.

    import nested_learning.hf                       # registers the classes with AutoConfig / AutoModelForCausalLM
    from nested_learning.hf import NestedLearningConfig, NestedLearningForCausalLM

    model = NestedLearningForCausalLM(NestedLearningConfig(model="hope", size="tiny"))
    model.save_pretrained("hf_dir"); AutoModelForCausalLM.from_pretrained("hf_dir")

``transformers`` is an optional dependency (``pip install "nested-learning-pytorch[hf]"``); importing this package
without it raises an ImportError naming the command.
"""

from nested_learning.hf._deps import require_transformers

require_transformers()

from nested_learning.hf.configuration import MODEL_TYPE, NestedLearningConfig  # noqa: E402
from nested_learning.hf.modeling import NestedLearningForCausalLM, StreamCache  # noqa: E402


def _register() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(MODEL_TYPE, NestedLearningConfig, exist_ok=True)
    AutoModelForCausalLM.register(NestedLearningConfig, NestedLearningForCausalLM, exist_ok=True)


_register()

__all__ = ["NestedLearningConfig", "NestedLearningForCausalLM", "StreamCache"]
