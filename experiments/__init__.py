"""The pre-registered reproduction of the paper's quality claims (issue 6), run from the repository root.

- ``experiments.protocol``: the protocol as data (model, training, evaluation, configurations, seeds,
  claims and the verdict thresholds), fixed before any run;
- ``python -m experiments.run``: one run of the protocol (train, evaluate, record the cost);
- ``python -m experiments.report``: ``REPORT.md`` and its figures from the runs' outputs.

``gpu_runs.sh`` makes the runs on a machine of several GPUs.
"""
