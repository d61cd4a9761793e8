"""Needle-in-a-haystack at growing context lengths (paper Table 1).

Usage: ``python experiments/long_context.py --help``; ``--quick`` runs a tiny end-to-end version in seconds.
The work is done by ``nested_learning.evaluation.long_context.main``.
"""

from nested_learning.evaluation.long_context import main

if __name__ == "__main__":
    raise SystemExit(main())
