"""Data: English corpora and GPT-2 tokenizer from installed packages, cached token streams, LM batches.

``load_lm_documents`` -> ``get_tokenizer`` -> ``load_tokens`` (uint16 memmap cache) -> ``TokenBatcher`` /
``eval_batches``. ``load_classification_set`` gives the labelled sets for continual learning.
"""

from .corpus import available_sets, load_classification_set, load_lm_documents
from .lm_batches import TokenBatcher, eval_batches
from .token_cache import load_tokens
from .tokenizer import get_tokenizer
from .unigram import unigram_perplexity

__all__ = [
    "TokenBatcher",
    "available_sets",
    "eval_batches",
    "get_tokenizer",
    "load_classification_set",
    "load_lm_documents",
    "load_tokens",
    "unigram_perplexity",
]

# Synthetic tasks (MAD, formal languages), needle-in-a-haystack instances and class-incremental streams.
from .continual import make_stream  # noqa: E402
from .niah import NIAH_TASKS, make_instance, make_instances  # noqa: E402
from .synthetic import make_examples, task_names  # noqa: E402

__all__ += ["NIAH_TASKS", "make_examples", "make_instance", "make_instances", "make_stream", "task_names"]
