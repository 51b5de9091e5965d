"""Evaluation of looped LMs: per-step accuracy and NLL by difficulty, Q-exit sweeps and their
Pareto frontier (``metrics``), computed under any parallel layout (``runner``) and written as a
JSON report, plots and a console table (``report``). CLI: ``tools/evaluate.py``."""
