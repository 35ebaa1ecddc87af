"""The experiment tools: what measures the estimators and runs grids of training runs.

`gradvar.py` (`python -m tpx_ext.gradvar`) measures each estimator's gradient variance, error,
SNR and cost versus the horizon, on the toy systems of `systems.py` or a trained Dreamer actor
(`--checkpoint`); `sweep.py` (`python -m tpx_ext.sweep`) runs grids of Dreamer training runs
through Ray (docs/SWEEP.md). Their plots, progress bars and Ray need the `experiments` extra
(`pip install --no-build-isolation '.[experiments]'`, tpx_ext/extras.py); the sweep's trials
and `gradvar --checkpoint` need the `dreamer` extra too.
"""
