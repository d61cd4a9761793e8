"""The optional dependencies of the transformers integration, imported only when it is used."""

from __future__ import annotations

INSTALL_HF = 'pip install "nested-learning-pytorch[hf]"  (or: pip install "transformers>=5.24")'
MIN_TRANSFORMERS = (5, 24)  # generate() passes the cache as ``cache`` (earlier releases: ``past_key_values``)


def require_transformers():
    """``transformers``, or an ImportError that names the pip command."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError(f"nested_learning.hf needs Hugging Face transformers: {INSTALL_HF}") from err
    found = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    if found < MIN_TRANSFORMERS:
        raise ImportError(f"nested_learning.hf needs transformers >= 5.24, found {transformers.__version__}: "
                          f"{INSTALL_HF}")
    return transformers
