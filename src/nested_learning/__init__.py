"""nested-learning: a PyTorch implementation of Nested Learning (Behrouz et al., NeurIPS 2025).

Subpackages (data flows downwards only): ``ops`` (pure update rules), ``memory`` (modules that own a memory),
``optimizers``, ``models``, ``data``, ``training``, ``evaluation``.
"""

__version__ = "0.1.0"
