"""The experiment tools: what measures the estimators and runs grids of training runs.

`gradvar.py` (`python -m tpx_ext.gradvar`) measures each estimator's gradient variance, error,
SNR and cost versus the horizon (`gradvar_measure.py`; its tables and plots:
`gradvar_report.py`), on the toy systems of `systems.py` or a trained Dreamer actor
(`--checkpoint`); `control.py` trains policies through those systems and `frozen.py` fresh
behaviours in a trained run's frozen world model (learned returns; `report.py` their shared
statistics and plots); `sweep.py` (`python -m tpx_ext.sweep`) runs grids of Dreamer training runs
through Ray (docs/SWEEP.md). Their plots, progress bars and Ray need the `experiments` extra
(`pip install --no-build-isolation '.[experiments]'`, tpx_ext/extras.py); the sweep's trials
and `gradvar --checkpoint` need the `dreamer` extra too.
"""
