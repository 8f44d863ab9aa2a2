"""Hyperparameter sweeps: an Optuna study over any recipe fields, each trial an ordinary run.

``space.py`` parses and checks the search space, ``run.py`` drives the study (resume, pruning),
``report.py`` writes the results. Importing this package stays light (optuna loads on first use),
so `tunelab --help` stays fast.
"""

from tunelab.sweep.cli import sweep_cmd

__all__ = ["sweep_cmd"]
