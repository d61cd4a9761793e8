"""Language modelling: train a model on the corpus, report validation and streaming perplexity.

Usage: ``python experiments/train_lm.py --help``; ``--quick`` runs a tiny end-to-end version in seconds.
The work is done by ``nested_learning.evaluation.language_modeling.main``.
"""

from nested_learning.evaluation.language_modeling import main

if __name__ == "__main__":
    raise SystemExit(main())
