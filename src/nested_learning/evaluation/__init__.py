"""Evaluation: the suites of the paper's experiments and the report that runs them all.

Modules (imported on use, so that importing the package stays light):

* ``language_modeling``: validation and streaming perplexity (test-time memory updates on/off);
* ``continual`` (+ ``continual_metrics``, ``scoring``, ``ewc``): class-incremental learning, Fig 6;
* ``long_context``: needle-in-a-haystack against context length, Table 1;
* ``synthetic_suite``: MAD and formal languages, Tables 4-5;
* ``harness``, ``backbone``, ``train_loop``: what the suites share; ``presets``, ``report_tables``, ``plots``:
  the report (``nested_learning.report.run_report``).
"""
