"""Experiments built from the library: the demo, sweeps at equal compute, the paper's ablations, reports.

``demo`` is the main job (``calm demo``); ``sweep`` and ``sweep_results`` run and tabulate grids of
overrides at one training budget; ``studies`` names the paper's ablations as sweeps; ``report``
writes a run's report from its logged metrics, with ``report_plots`` (its figures) and ``verdict``
(each CALM's Brier-n as a ratio to the GPT's, with standard errors, in words).
"""
