"""Ablation of the four knowledge transfers between CMS levels (Eq 24-30) on streaming perplexity and continual
learning, in a small HOPE.

Usage: ``python experiments/transfer_ablation.py --help``; ``--quick`` runs a tiny end-to-end version in seconds.
The work is done by ``nested_learning.evaluation.transfer_ablation.main``.
"""

from nested_learning.evaluation.transfer_ablation import main

if __name__ == "__main__":
    raise SystemExit(main())
