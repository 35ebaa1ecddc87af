"""Gradient variance, error, SNR and cost of each estimator versus the horizon.

    python -m tpx_ext.gradvar [--system rotor|rnn|logistic|lorenz|pendulum|linear] ...
    python -m tpx_ext.gradvar --checkpoint runs/default --horizons 15 50 100 200
    python -m tpx_ext.gradvar --suite --out docs/results/gradvar_suite

For every horizon and estimator it takes `reps` independent batch gradients of
one fixed policy on a toy system (`tpx_ext.experiments.systems`), or of a trained Dreamer
agent's actor in its learned world model (`--checkpoint`: `batch` start states,
the posterior states of one replay batch, fixed across the reps; the noise is
the imagination's), and reports:
- variance: trace of the covariance of the batch gradient (over the reps);
- error: root mean square of |g - g_ref| over the reps, where g_ref is the exact
  gradient (linear system) or the mean of `ref_batches` fresh gradients of batch
  `ref_scale * batch` of whichever of rp / lr, both exactly unbiased, has the
  lower variance there (its standard error is printed, so errors below it are
  not resolved);
- snr: |g_ref| / sqrt(variance);
- cos: the cosine between the reps' mean gradient and g_ref: whether the estimator's mean
  points the way the gradient does (a biased estimator can have a small variance and
  error and still point elsewhere; the mean's own noise is variance / reps);
- norm: median |g| over the reps with a finite gradient (how the gradient's size grows with
  the horizon; NaN if none was finite);
- ms/grad: median wall time of one gradient (rollout + backward);
- nonfinite: fraction of the reps whose gradient had an inf or NaN.
Every estimator sees the same noise (rep i of horizon H draws from the same
seed for all of them), so their variances are compared on common random
numbers. An estimator with running statistics (tpx with momentum) first takes
`warmup` gradients, and its statistics keep updating through the reps, as in
training.

`--suite` runs every chaotic system at every horizon with every estimator in
`ESTIMATORS` (all tpx weight rules included) and writes OUT.csv, OUT.md (the
tables, with each tpx rule's variance relative to min(rp, lr) and to tp) and
OUT.png / OUT_ratio.png. Each (system, horizon) is cached in --cache after every
estimator, so an interrupted suite resumes where it stopped (--fresh recomputes).
Otherwise it prints a table and writes OUT.csv and OUT.png.
"""


import os
import sys
from typing import Dict, List

import torch

from ..cli import Parser
from .gradvar_measure import (BASIC, COLUMNS, ESTIMATORS, SUITE_HORIZONS, WARMUP_OFFSET,  # noqa: F401
                              batch_gradients, flat_grad, has_history, make_estimator, measure,
                              mode_of, rep_generator, row, run, run_suite, toy_problem)
from .gradvar_report import format_table, plot, plot_suite, ratio_tables, suite_markdown, write_csv  # noqa: F401
from .systems import CHAOTIC, SYSTEMS


def main(argv=None) -> List[Dict]:
    p = Parser(prog="python -m tpx_ext.gradvar", description=__doc__.split("\n\n")[0])
    p.add_argument("--system", default="rotor", choices=list(SYSTEMS))
    p.add_argument("--checkpoint", metavar="RUN_DIR",
                   help="a Dreamer run directory: study its actor in its world model instead")
    p.add_argument("--suite", action="store_true",
                   help="every chaotic system, horizon and estimator (see --systems, --estimators)")
    p.add_argument("--systems", nargs="+", default=list(CHAOTIC), choices=list(SYSTEMS),
                   help="--suite: the systems")
    p.add_argument("--horizons", type=int, nargs="+",
                   help="default: 1 5 10 20 50 100 (--suite: 1 3 10 30 100 200)")
    p.add_argument("--modes", "--estimators", dest="modes", nargs="+", choices=list(ESTIMATORS),
                   help="estimators; default: the five modes (without tp for --checkpoint), "
                        "--suite: all of ESTIMATORS")
    p.add_argument("--batch", type=int, help="default 32 (--suite: 128)")
    p.add_argument("--reps", type=int, help="batch gradients per (horizon, mode); default 20 "
                                            "(--suite: 64)")
    p.add_argument("--warmup", type=int, help="gradients before the reps for estimators with "
                                              "running statistics; default 0 (--suite: 20)")
    p.add_argument("--ref-batches", type=int, help="gradients in the reference; default 200 "
                                                   "(--suite: 16)")
    p.add_argument("--ref-scale", type=int, help="batch of the reference gradients / --batch; "
                                                 "default 1 (--suite: 8)")
    p.add_argument("--hidden", type=int, default=16, help="policy hidden width")
    p.add_argument("--rho", type=float, default=0.5, help="LR weight of mode mix")
    p.add_argument("--momentum", type=float, help="running-variance momentum of tpx")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: the tensors are tiny, threads only synchronise)")
    p.add_argument("--out", default="gradvar", help="writes OUT.csv and OUT.png (--suite: OUT.md "
                                                    "and OUT_ratio.png too)")
    p.add_argument("--cache", default="runs/gradvar_suite", help="--suite: the resumable parts")
    p.add_argument("--fresh", action="store_true", help="--suite: ignore cached parts")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    def pick(value, default, suite_default):
        return value if value is not None else (suite_default if a.suite else default)

    horizons = pick(a.horizons, [1, 5, 10, 20, 50, 100], list(SUITE_HORIZONS))
    batch, reps = pick(a.batch, 32, 128), pick(a.reps, 20, 64)
    warmup, ref_batches, ref_scale = pick(a.warmup, 0, 20), pick(a.ref_batches, 200, 16), pick(a.ref_scale, 1, 8)
    for name, value in (("batch", batch), ("reps", reps), ("ref-batches", ref_batches),
                        ("ref-scale", ref_scale), ("hidden", a.hidden), ("threads", a.threads)):
        if value < 1:
            p.error(f"--{name} must be >= 1, got {value}")
    if warmup < 0 or min(horizons) < 1:
        p.error(f"--warmup must be >= 0 and --horizons >= 1, got {warmup} and {horizons}")
    if a.checkpoint is not None:
        from ..dreamer import checkpoint

        if not checkpoint.exists(a.checkpoint):
            p.error(f"--checkpoint: {a.checkpoint} holds no Dreamer run (no "
                    f"{checkpoint.CHECKPOINT_FILE})")
        if a.suite or "tp" in (a.modes or []):
            p.error("--checkpoint takes no --suite and no tp (its per-sample parameter "
                    "gradients, B x P, do not fit a Dreamer actor)")
    with p.reporting(ValueError):  # rho and momentum, checked by the mode table
        for m in a.modes or BASIC:
            make_estimator(m, a.rho, a.momentum)
    torch.set_num_threads(a.threads)
    out_dir = os.path.dirname(a.out)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    if a.suite:
        rows, seconds = run_suite(a.systems, horizons, a.modes, batch, reps, warmup, ref_batches, ref_scale,
                         a.hidden, a.seed, a.device, a.cache, a.fresh, not a.no_progress)
        config = {"batch": batch, "reps": reps, "warm-up": warmup,
                  "reference": f"{ref_batches} x batch {ref_scale * batch}", "policy hidden": a.hidden,
                  "seed": a.seed}
        command = "python -m tpx_ext.gradvar " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(a.out + ".md", "w") as f:
            f.write(suite_markdown(rows, command, config, seconds) + "\n")
        write_csv(rows, a.out + ".csv")
        plot_suite(rows, a.out + ".png", a.out + "_ratio.png")
        print(f"wrote {a.out}.md, {a.out}.csv, {a.out}.png and {a.out}_ratio.png "
              f"({seconds / 60:.1f} min of compute)")
        return rows
    modes = a.modes or [m for m in BASIC if not (a.checkpoint and m == "tp")]
    with p.reporting(FileNotFoundError, ValueError):  # a run directory missing a file, or foreign
        rows = run(a.system, horizons, modes, batch, reps, ref_batches, a.hidden, a.rho,
                   a.momentum if a.momentum is not None else 0.0, a.seed, a.device,
                   not a.no_progress, a.checkpoint, warmup, ref_scale)
    print(format_table(rows))
    write_csv(rows, a.out + ".csv")
    plot(rows, a.out + ".png")
    print(f"wrote {a.out}.csv and {a.out}.png")
    return rows


if __name__ == "__main__":
    main()
