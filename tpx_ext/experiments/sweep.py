"""Run a grid of training runs (tasks x estimators x horizons x seeds) through Ray.

    python -m tpx_ext.sweep --out sweeps/h --tasks cartpole_balance --estimators rp tpx \\
        --horizons 15 100 --seeds 0 1 2 [--configs PRESET ...] [--set key=value ...] \\
        [--steps N] [--cpus-per-trial 1] [--gpus-per-trial 0] [--address auto]

Every grid point is one `tpx_ext.train` run in OUT/<task>_<estimator>_h<H>_s<seed>, executed
as a Ray task: on a local Ray instance by default, on a running Ray cluster with --address.
Re-running the same command skips finished trials and resumes the others from their last
checkpoint. At the end OUT holds summary.md, summary.csv, summary_groups.csv and
curves_<task>.png; `python -m tpx_ext.sweep --out OUT --summary` writes them at any time,
running nothing. See docs/SWEEP.md.
"""

import argparse
import csv
import dataclasses
import itertools
import json
import math
import os
import shutil
import statistics
import sys
import time
from typing import Dict, List, Optional

from ..cli import Parser, UsageError
from ..dreamer import configs
from ..dreamer.atomic import atomic_write

SPEC_FILE = "sweep.json"
INSTALL_HINT = 'pip install --no-build-isolation ".[experiments]"'
# Keys the sweep sets itself: the grid axes, --steps, and the thread count (--cpus-per-trial).
RESERVED_KEYS = ("task", "estimator", "horizon", "seed", "steps", "threads")
# The TPX weights in the summary are averaged over this final fraction of the training
# records: the weights drift during training, and the end is what the final return reflects.
LAST_RECORDS_FRACTION = 0.1
GRID_AXES = ("tasks", "estimators", "horizons", "seeds")  # a grid may grow along these

TRIAL_COLUMNS = ("task", "estimator", "horizon", "seed", "status", "eval_return", "env_steps",
                 "actor_skipped_frac", "actor_clipped_frac", "actor_grad_norm", "k_lr_first",
                 "k_lr_last")
GROUP_COLUMNS = ("task", "estimator", "horizon", "eval_return_mean", "eval_return_std", "seeds",
                 "vs_rp_diff", "vs_rp_p")
# The estimator every other one is compared with, at the same task and horizon.
BASELINE = "rp"


@dataclasses.dataclass(frozen=True)
class Trial:
    task: str
    estimator: str
    horizon: int
    seed: int

    @property
    def name(self) -> str:
        return configs.run_name(self.task, self.estimator, self.horizon, self.seed)


class TrialError(RuntimeError):
    """The trainer refused a trial's config or run directory (the reason is the message)."""


# ----------------------------------------------------------------------------- the grid
def parse_args(argv: Optional[List[str]]):
    p = Parser(prog="python -m tpx_ext.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="sweep directory (holds one run dir per trial)")
    p.add_argument("--summary", action="store_true",
                   help="only write and print the summaries of the grid OUT holds, running nothing "
                        "(also while another command runs its trials)")
    p.add_argument("--tasks", nargs="+", help="dm_control tasks, e.g. walker_walk")
    p.add_argument("--estimators", nargs="+",
                   help=f"any of {', '.join(configs.ESTIMATORS)}; --set estimator_args.<knob>=V "
                        "sets a knob for the estimators that take it")
    p.add_argument("--horizons", nargs="+", type=int)
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--configs", nargs="+", default=[], metavar="PRESET",
                   help=f"trainer presets ({', '.join(configs.PRESETS)}), applied left to right")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="trainer config keys for every trial, e.g. --set batch_size=32 estimator_args.ucb=1")
    p.add_argument("--steps", type=int, default=None,
                   help="environment steps per trial (default: from the presets)")
    p.add_argument("--cpus-per-trial", type=int, default=1,
                   help="CPUs Ray reserves for a trial, also its torch thread count")
    p.add_argument("--gpus-per-trial", type=float, default=0.0,
                   help="GPUs Ray reserves for a trial; Ray hides the GPUs from a trial without one")
    p.add_argument("--address", default=None,
                   help="Ray cluster to run on ('auto' or HEAD_IP:6379); default: a local Ray")
    args = p.parse_args(argv)
    missing = [f"--{a}" for a in GRID_AXES if getattr(args, a) is None]
    if missing and not args.summary:
        p.error(f"the grid needs {', '.join(missing)} (or --summary to summarize {args.out})")
    return p, args


def build_spec(args) -> Dict:
    """The sweep's identity, checked on re-runs. UsageError with the reason on an invalid grid,
    so that nothing is written and no trial is started for a sweep that cannot run."""
    for axis in GRID_AXES:
        values = getattr(args, axis)
        if len(set(values)) != len(values):
            raise UsageError(f"--{axis}: duplicate values in {values}")
    if args.cpus_per_trial < 1:
        raise UsageError(f"--cpus-per-trial must be >= 1, got {args.cpus_per_trial}")
    if args.gpus_per_trial < 0:
        raise UsageError(f"--gpus-per-trial must be >= 0, got {args.gpus_per_trial}")
    overrides = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set: expected KEY=VALUE, got {item!r}")
        if key in RESERVED_KEYS:
            raise UsageError(f"--set {key}: set by the sweep itself (grid axes, --steps, --cpus-per-trial)")
        if key in overrides:
            raise UsageError(f"--set: {key} given twice")
        overrides[key] = value
    knobs = [k.split(".", 1)[1] for k in overrides if k.startswith("estimator_args.")]
    for knob in knobs:
        if not any(knob in configs.knobs_of(e) for e in args.estimators if e in configs.ESTIMATORS):
            raise UsageError(f"--set estimator_args.{knob}: no estimator of the grid "
                             f"({', '.join(args.estimators)}) takes {knob}")
    try:
        steps = {} if args.steps is None else {"steps": args.steps}
        base = configs.build(args.configs, {**estimator_overrides(overrides, args.estimators[0]),
                                            "estimator": args.estimators[0], **steps})
        for est, h in itertools.product(args.estimators, args.horizons):
            configs.build(args.configs, {**estimator_overrides(overrides, est),
                                         "estimator": est, "horizon": h})
    except ValueError as e:
        raise UsageError(f"invalid sweep: {e}")
    from ..dreamer.envs import task_names  # imports dm_control: only here, after the cheap checks

    unknown = sorted(set(args.tasks) - set(task_names()))
    if unknown:
        raise UsageError(f"--tasks: unknown {unknown}; valid: {', '.join(sorted(task_names()))}")
    return {"tasks": args.tasks, "estimators": args.estimators, "horizons": args.horizons,
            "seeds": args.seeds, "configs": args.configs, "set": overrides, "steps": base.steps}


def check_spec(out: str, spec: Dict) -> Dict:
    """Record the sweep in OUT/sweep.json and return the grid OUT now holds. The grid may grow
    (or a re-run may name part of it): OUT's grid becomes the union of the axes. The settings
    every trial shares (presets, --set keys, steps) are pinned: a change would mix configs
    under the same run dir names."""
    path = os.path.join(out, SPEC_FILE)
    merged = spec
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        diff = ", ".join(f"{k}: {saved.get(k)!r} -> {spec.get(k)!r}" for k in sorted(set(saved) | set(spec))
                         if k not in GRID_AXES and saved.get(k) != spec.get(k))
        if diff:
            raise UsageError(f"{out} holds a sweep with other settings ({path}); differences: {diff}. "
                     "Re-run it with its own settings, or pick another --out")
        merged = {**saved, **{a: saved[a] + [v for v in spec[a] if v not in saved[a]]
                              for a in GRID_AXES}}
        if merged == saved:
            return saved
    os.makedirs(out, exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(merged, indent=2).encode()))
    return merged


def trials_of(spec: Dict) -> List[Trial]:
    return [Trial(*p) for p in itertools.product(spec["tasks"], spec["estimators"],
                                                 spec["horizons"], spec["seeds"])]


def estimator_overrides(overrides: Dict[str, object], estimator: str) -> Dict[str, object]:
    """--set keys for one estimator of the grid: estimator_args.<knob> only where its mode
    takes that knob (a sweep over rp and mix sets mix's rho)."""
    if estimator not in configs.ESTIMATORS:
        return overrides  # the config check names the valid estimators
    takes = configs.knobs_of(estimator)
    return {k: v for k, v in overrides.items()
            if not k.startswith("estimator_args.") or k.split(".", 1)[1] in takes}


def trial_overrides(spec: Dict, trial: Trial, threads: int) -> Dict[str, object]:
    """The trainer config keys of a trial (over the sweep's presets)."""
    return {**estimator_overrides(spec["set"], trial.estimator), "task": trial.task, "estimator": trial.estimator,
            "horizon": trial.horizon, "seed": trial.seed, "steps": spec["steps"],
            "threads": threads}


def read_checkpoint(run_dir: str) -> Optional[Dict]:
    """The checkpoint's counters and last evaluation, or None before the first checkpoint."""
    from ..dreamer import checkpoint

    if not checkpoint.exists(run_dir):
        return None
    state = checkpoint.read_state(run_dir)
    return {"counters": state["counters"], "last_eval": state["last_eval"]}


def is_complete(run_dir: str, steps: int) -> bool:
    state = read_checkpoint(run_dir)
    return state is not None and state["counters"]["env_steps"] >= steps


# ----------------------------------------------------------------------------- one trial
def run_trial(presets: List[str], overrides: Dict[str, object], run_dir: str, steps: int):
    """Body of a Ray task: resume the run if it has a checkpoint, else start it over. Decided
    here rather than by the driver, so that Ray's retry of a task whose node died resumes it."""
    from ..dreamer import checkpoint, train

    t0 = time.perf_counter()
    resume = checkpoint.exists(run_dir)
    if not resume and os.path.isdir(run_dir):  # killed before its first checkpoint
        shutil.rmtree(run_dir)
    try:
        if resume:
            cfg, run_dir = train.prepare([], {"steps": steps}, run_dir, resume=True)
        else:
            cfg, run_dir = train.prepare(presets, overrides, run_dir)
    except (UsageError, ValueError) as e:
        raise TrialError(str(e)) from None
    result = train.run(cfg, run_dir, resume=resume, quiet=True)
    return result, time.perf_counter() - t0


def import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError(f"tpx_ext.sweep needs Ray; install it with: {INSTALL_HINT}")
    return ray


def run_trials(ray, args, spec: Dict, todo: List[Trial], done: int, total: int) -> Dict[str, str]:
    """Runs `todo` on Ray, printing a line per finished trial; returns {name: error with its
    traceback} of the failed ones (workers' output is not shown). A failed trial does not stop
    the others."""
    if args.address:
        try:
            ray.init(address=args.address, log_to_driver=False, logging_level="WARNING")
        except (ConnectionError, ray.exceptions.AuthenticationError) as e:
            raise UsageError(f"cannot connect to the Ray cluster at {args.address}: {e}. Is it running "
                     "(`ray status` on the head)? Does this machine have the cluster's token "
                     "(RAY_AUTH_MODE=token, ~/.ray/auth_token)? See docs/SWEEP.md")
    else:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                 log_to_driver=False, logging_level="WARNING")
    try:
        check_fits(ray, args)
        task = ray.remote(num_cpus=args.cpus_per_trial, num_gpus=args.gpus_per_trial)(run_trial)
        out = os.path.abspath(args.out)  # workers do not share the driver's working directory
        pending = {}
        # One seed of every configuration before the next seed, longest horizons first: an
        # interrupted sweep has compared everything once, and long trials do not trail alone.
        order = sorted(todo, key=lambda t: (spec["seeds"].index(t.seed), -t.horizon))
        for trial in order:
            run_dir = os.path.join(out, trial.name)
            overrides = trial_overrides(spec, trial, args.cpus_per_trial)
            pending[task.remote(spec["configs"], overrides, run_dir, spec["steps"])] = trial
        failed = {}
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            trial = pending.pop(ref)
            done += 1
            try:
                result, seconds = ray.get(ref)
            except Exception as e:  # the trial's own exception (RayTaskError) or a lost worker
                cause = getattr(e, "cause", None) or e
                failed[trial.name] = getattr(e, "traceback_str", None) or str(e)
                print(f"[{done}/{total}] {trial.name} FAILED: {type(cause).__name__}: {cause}",
                      flush=True)
                continue
            print(f"[{done}/{total}] {trial.name}: eval return {result['eval_return']:.1f} "
                  f"in {seconds:.1f} s", flush=True)
        return failed
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to continue (finished trials are "
              "skipped, the others resume from their last checkpoint)", file=sys.stderr)
        raise
    finally:
        ray.shutdown()


def check_fits(ray, args) -> None:
    """A trial that no node can hold waits forever, and silently (workers' output is off):
    refuse it on a local Ray, warn on a cluster, which may still gain such a node."""
    need = {"CPU": args.cpus_per_trial, "GPU": args.gpus_per_trial}
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    if any(all(r.get(k, 0) >= v for k, v in need.items()) for r in nodes):
        return
    have = ", ".join(f"{r.get('CPU', 0):g} CPUs + {r.get('GPU', 0):g} GPUs" for r in nodes)
    msg = (f"no Ray node has the {args.cpus_per_trial} CPUs and {args.gpus_per_trial:g} GPUs a "
           f"trial asks for (--cpus-per-trial, --gpus-per-trial); the nodes have: {have}")
    if not args.address:
        raise UsageError(msg)
    print(f"warning: {msg}; the trials wait until such a node joins", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- summary
def trial_row(out: str, trial: Trial, steps: int) -> Dict:
    """One summary row: the final evaluation and counters from the checkpoint, the TPX
    weights from metrics.jsonl. Numbers are None where the run has none (e.g. k for rp)."""
    from ..dreamer.logger import METRICS_FILE, read_metrics

    run_dir = os.path.join(out, trial.name)
    row = dict.fromkeys(TRIAL_COLUMNS)
    row.update(dataclasses.asdict(trial), status="failed")
    if not os.path.exists(run_dir):  # not started (yet): the sweep was stopped before it
        row["status"] = "not run"
        return row
    state = read_checkpoint(run_dir)
    if state is None:
        return row
    c = state["counters"]
    # "incomplete": stopped or failed after a checkpoint; re-running the sweep resumes it.
    row.update(status="done" if c["env_steps"] >= steps else "incomplete",
               eval_return=state["last_eval"]["eval_return"], env_steps=c["env_steps"])
    if c["updates"]:
        row.update(actor_skipped_frac=c["actor_skipped"] / c["updates"],
                   actor_clipped_frac=c["actor_clipped"] / c["updates"])
    records = read_metrics(os.path.join(run_dir, METRICS_FILE))
    norms = [r["actor_grad_norm"] for r in records
             if math.isfinite(r.get("actor_grad_norm", math.nan))]
    if norms:
        row["actor_grad_norm"] = statistics.median(norms)
    ks = [r["k_action"] for r in records if "k_action" in r]
    if ks:
        last = ks[-max(1, math.ceil(len(ks) * LAST_RECORDS_FRACTION)):]
        row.update(k_lr_first=finite_mean([k[0] for k in last]),
                   k_lr_last=finite_mean([k[-1] for k in last]))
    return row


def finite_mean(values: List[float]) -> Optional[float]:
    """Mean over the finite values: an update where every coordinate was non-finite has no
    weight (NaN), which says nothing about the others."""
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else None


def group_rows(rows: List[Dict]) -> List[Dict]:
    """Mean and (population) std of the final eval return over the finished seeds, and the
    difference to `rp` at the same task and horizon with Welch's t-test (two-sided p)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["task"], r["estimator"], r["horizon"]), []).append(r)
    finished = {key: [r["eval_return"] for r in members if r["status"] == "done"]
                for key, members in groups.items()}
    out = []
    for (task, est, h), returns in finished.items():
        mean = sum(returns) / len(returns) if returns else None
        std = math.sqrt(sum((x - mean) ** 2 for x in returns) / len(returns)) if returns else None
        diff, p = None, None
        base = finished.get((task, BASELINE, h), [])
        if est != BASELINE and len(returns) >= 2 and len(base) >= 2:
            diff, p = mean - sum(base) / len(base), welch_p(returns, base)
        out.append({"task": task, "estimator": est, "horizon": h, "eval_return_mean": mean,
                    "eval_return_std": std, "seeds": len(returns), "vs_rp_diff": diff,
                    "vs_rp_p": p})
    return out


def welch_p(a: List[float], b: List[float]) -> Optional[float]:
    """Two-sided p-value of Welch's t-test (unequal variances); None when both samples are
    constant, where the test is undefined."""
    from scipy import stats  # the experiments extra; imported here, as only summaries need it

    if statistics.pvariance(a) == 0 and statistics.pvariance(b) == 0:
        return None
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(spec: Dict, rows: List[Dict], groups: List[Dict]) -> str:
    def table(header, lines):
        return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                         + ["| " + " | ".join(line) + " |" for line in lines])

    trials = table(
        ["task", "estimator", "H", "seed", "status", "eval return", "env steps", "actor skipped",
         "actor clipped", "actor grad norm", "k_LR first", "k_LR last"],
        [[r["task"], r["estimator"], str(r["horizon"]), str(r["seed"]), r["status"],
          fmt(r["eval_return"], ".1f"), fmt(r["env_steps"], "d"), fmt(r["actor_skipped_frac"], ".3f"),
          fmt(r["actor_clipped_frac"], ".3f"), fmt(r["actor_grad_norm"], ".3g"),
          fmt(r["k_lr_first"], ".3g"), fmt(r["k_lr_last"], ".3g")]
         for r in rows])
    grouped = table(
        ["task", "estimator", "H", "eval return (mean +- std over seeds)", "seeds",
         f"vs {BASELINE} (Welch p)"],
        [[g["task"], g["estimator"], str(g["horizon"]),
          "-" if g["eval_return_mean"] is None
          else f"{g['eval_return_mean']:.1f} +- {g['eval_return_std']:.1f}", str(g["seeds"]),
          "-" if g["vs_rp_diff"] is None
          else f"{g['vs_rp_diff']:+.1f} (p = {fmt(g['vs_rp_p'], '.2g')})"]
         for g in groups])
    presets = " ".join(spec["configs"]) or "(defaults)"
    sets = " ".join(f"{k}={v}" for k, v in spec["set"].items()) or "none"
    pct = round(LAST_RECORDS_FRACTION * 100)
    return (f"# Sweep summary\n\npresets: {presets}; --set: {sets}; {spec['steps']} env steps "
            f"per trial.\n\n## Trials\n\nactor skipped / clipped: fraction of the actor updates "
            f"skipped as non-finite / with a clipped gradient norm. actor grad norm: median over the "
            f"training records of the actor gradient's norm before clipping. k_LR first / last: mean TPX "
            f"weight on LR (0 = all RP, 1 = all LR) at the first / last horizon step over the "
            f"last {pct}% of the training records. status: done; incomplete (stopped after a "
            f"checkpoint: a re-run resumes it); failed (no checkpoint); not run.\n\n{trials}\n\n## Over seeds\n\n"
            f"Population std over the finished seeds. vs {BASELINE}: difference of the mean to "
            f"{BASELINE}'s at the same task and horizon, and the two-sided p-value of Welch's "
            f"t-test, where both have at least 2 finished seeds.\n\n{grouped}\n")


def write_csv(path: str, columns, rows: List[Dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if r[k] is None else r[k] for k in columns} for r in rows)


def summarize(out: str, spec: Dict, trials: List[Trial]) -> str:
    from ..dreamer.plot import plot

    rows = [trial_row(out, t, spec["steps"]) for t in trials]
    groups = group_rows(rows)
    text = markdown(spec, rows, groups)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    write_csv(os.path.join(out, "summary.csv"), TRIAL_COLUMNS, rows)
    write_csv(os.path.join(out, "summary_groups.csv"), GROUP_COLUMNS, groups)
    for task in spec["tasks"]:
        runs = [os.path.join(out, t.name) for t, r in zip(trials, rows)
                if t.task == task and r["status"] == "done"]
        if runs:
            plot(runs, os.path.join(out, f"curves_{task}.png"), title=task)
    return text


def print_summary(out: str) -> int:
    """Summarizes the grid recorded in OUT/sweep.json as far as its trials have got."""
    path = os.path.join(out, SPEC_FILE)
    if not os.path.exists(path):
        raise UsageError(f"{out} holds no sweep (no {SPEC_FILE})")
    with open(path) as f:
        spec = json.load(f)
    print(summarize(out, spec, trials_of(spec)), flush=True)
    print(f"summary: {os.path.join(out, 'summary.md')}, summary.csv, summary_groups.csv, "
          "curves_<task>.png", flush=True)
    return 0


# ----------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> int:
    """Returns the exit status: 1 if any trial failed."""
    p, args = parse_args(argv)
    with p.reporting():
        if args.summary:
            return print_summary(args.out)
        ray = import_ray()
        spec = build_spec(args)
        check_spec(args.out, spec)  # the grid OUT holds, of which this command may name a part
        return run_grid(args, ray, spec)


def run_grid(args, ray, spec: Dict) -> int:
    """Runs the trials not finished yet and prints the summary; 1 if any trial failed."""
    trials = trials_of(spec)
    todo = [t for t in trials if not is_complete(os.path.join(args.out, t.name), spec["steps"])]
    total, finished = len(trials), len(trials) - len(todo)
    if finished:
        print(f"{finished}/{total} trials already finished, skipped", flush=True)
    failed = run_trials(ray, args, spec, todo, finished, total) if todo else {}
    print_summary(args.out)
    if failed:
        for name, error in failed.items():
            print(f"\n{name} failed:\n{error}", file=sys.stderr)
        print(f"\n{len(failed)}/{total} trials failed; re-run the same command to retry them",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
