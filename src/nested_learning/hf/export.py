"""``nested-learning export --checkpoint DIR --out HF_DIR``: a trainer checkpoint as a ``transformers`` model
directory (``model.safetensors``, ``config.json``, a tokenizer), loadable by ``AutoModelForCausalLM`` and
``lm_eval --model hf``.

The run's config names the model (``model``, ``size``, ``model_overrides``), which becomes the
:class:`NestedLearningConfig`; the weights come from the checkpoint, single-file or sharded (FSDP).
"""

from __future__ import annotations

from pathlib import Path


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Write ``out`` (a ``transformers`` model directory) from a trainer checkpoint; returns ``out``."""
    from nested_learning.hf import NestedLearningConfig, NestedLearningForCausalLM
    from nested_learning.hf.tokenizer import tokenizer_for
    from nested_learning.training.runs import load_run

    model, config, _ = load_run(checkpoint)
    tok = tokenizer_for(model)
    special = {}
    if tok is not None and tok.eos_token_id is not None:
        special = {"eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id}
    hf_config = NestedLearningConfig(model=config.model, size=config.size, overrides=config.model_overrides,
                                     **special)
    wrapper = NestedLearningForCausalLM(hf_config, model=model)
    out = Path(out)
    wrapper.save_pretrained(out)
    if tok is not None:
        tok.save_pretrained(out)
    return out
