"""Class-incremental continual learning on clinc, banking or dbpedia (paper Fig 6).

Usage: ``python experiments/continual_learning.py --help``; ``--quick`` runs a tiny end-to-end version in seconds.
The work is done by ``nested_learning.evaluation.continual.main``.
"""

from nested_learning.evaluation.continual import main

if __name__ == "__main__":
    raise SystemExit(main())
