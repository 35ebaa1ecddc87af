"""Behaviour learning in a frozen world model: the estimator apart from data collection.

    python -m tpx_ext.frozen --model runs/<trained run> --horizons 15 100 200 300 \\
        --estimators rp tpx --seeds 3 --updates 1000 --runs runs/frozen --out docs/results/frozen

A trained Dreamer run (`python -m tpx_ext.train`) provides a world model and its replay.
For every (horizon, estimator, seed) a fresh actor and critic (seeded; the same for every
estimator of a seed) are trained in that world model for `updates` updates: each samples a
replay batch (the run's batch size and sequence length), infers its posterior states and
takes one actor and one critic step imagined from them (`Dreamer.update_behavior`, with the
run's config except estimator, horizon and seed). No data is collected, and the world
model's parameters, its optimizer and the replay are never changed; the run directory is
only read. Every `eval_every` updates the agent is evaluated in the real environment
(`eval_episodes` episodes, mean action, the same environment seeds for every run).

Resumable like `tpx_ext.control`: RUNS/<run>/checkpoint.pt (actor, critic, their optimizers,
torch's and the replay sampler's RNG states, metrics) and metrics.jsonl are written
atomically at every evaluation; an interrupted run continues bit-identical; finished runs are
skipped. Writes OUT.csv (every evaluation), OUT.md (final returns, mean +- std over seeds,
Welch's p against rp at the same horizon, compute per run), OUT.png (return against update,
seed bands) and OUT_weights.png (tpx's weight on LR over the imagination steps).
"""

import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..cli import Parser
from ..dreamer import checkpoint, configs
from ..dreamer.agent import Dreamer
from ..dreamer.atomic import atomic_write
from ..dreamer.train import evaluate, resolve_device
from .parallel import run_jobs
from .report import mean_std, plot_profiles, plot_seed_bands, welch_p

EVAL_SEED = 20_000  # evaluation k uses environment seed EVAL_SEED + k, in every run


@dataclass(frozen=True)
class FrozenSpec:
    horizon: int
    estimator: str
    seed: int
    updates: int
    eval_every: int
    eval_episodes: int

    @property
    def name(self) -> str:
        return f"H{self.horizon}-{self.estimator}-s{self.seed}"


class FrozenModel:
    """A trained run's config, world-model weights and replay, read once."""

    def __init__(self, run_dir: str, device="cpu"):
        state, self.replay = checkpoint.load(run_dir, map_location=device)
        self.run_dir, self.device = run_dir, torch.device(device)
        self.config = configs.from_saved(state["config"])
        self.steps = state["counters"]["env_steps"]
        prefix = "world_model."
        self.weights = {k[len(prefix):]: v for k, v in state["agent"]["modules"].items()
                        if k.startswith(prefix)}
        self.obs_shape, self.action_dim = self.replay.obs_shape, self.replay.action_dim

    def agent(self, spec: FrozenSpec) -> Dreamer:
        """A Dreamer with this world model and a fresh actor and critic (seeded by spec.seed)."""
        # the model run's estimator knobs belong to its estimator, not to spec.estimator's
        cfg = configs.build([], {**self.config, "estimator": spec.estimator, "estimator_args": {},
                                 "horizon": spec.horizon, "seed": spec.seed})
        torch.manual_seed(spec.seed)
        agent = Dreamer(self.obs_shape, self.action_dim, cfg, self.device)
        agent.world_model.load_state_dict(self.weights)
        agent.world_model.requires_grad_(False)
        return agent


def train_run(model: FrozenModel, spec: FrozenSpec, run_dir: str, log_every: int = 0,
              stop_after: Optional[int] = None) -> Dict:
    """Train one actor and critic to `spec.updates` (from run_dir's checkpoint, if any);
    returns its record (spec, metrics, seconds). `stop_after`: stop after that many updates
    of this call (checkpointed), as an interruption would."""
    os.makedirs(run_dir, exist_ok=True)
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    agent = model.agent(spec)
    cfg, replay = agent.cfg, model.replay
    replay.reseed(spec.seed)
    record = {"spec": asdict(spec), "model": model.run_dir, "metrics": [], "seconds": 0.0,
              "update": 0, "skipped": 0}
    if os.path.exists(ckpt_path):
        ckpt = checkpoint.safe_load(ckpt_path, map_location=model.device)
        if ckpt["record"]["spec"] != asdict(spec):
            raise ValueError(f"{run_dir} holds a run with other settings "
                             f"({ckpt['record']['spec']}); use another --runs directory")
        agent.behavior.load_state_dict(ckpt["behavior"])
        agent.behavior.load_state_dict_extra(ckpt["behavior_extra"])
        torch.set_rng_state(ckpt["torch_rng"])
        replay.set_rng_state(ckpt["replay_rng"])
        record = ckpt["record"]

    def checkpoint_now():
        state = {"behavior": agent.behavior.state_dict(),
                 "behavior_extra": agent.behavior.state_dict_extra(),
                 "torch_rng": torch.get_rng_state(), "replay_rng": replay.rng_state(),
                 "record": record}
        atomic_write(ckpt_path, lambda f: torch.save(state, f))
        lines = "".join(json.dumps(m) + "\n" for m in record["metrics"])
        atomic_write(os.path.join(run_dir, "metrics.jsonl"), lambda f: f.write(lines.encode()))

    def evaluation(update: int, profile=None) -> Dict:
        returns, _ = evaluate(agent, cfg, EVAL_SEED + len(record["metrics"]), spec.eval_episodes)
        m = {"update": update, "return": float(np.mean(returns)), "return_std": float(np.std(returns))}
        if profile is not None:
            m["k_action"] = profile
        return m

    if record["update"] == 0 and not record["metrics"]:
        record["metrics"].append(evaluation(0))
        checkpoint_now()
    done_here, k_sum, k_count = 0, None, 0
    while record["update"] < spec.updates:
        if stop_after is not None and done_here >= stop_after:
            break
        t0 = time.perf_counter()
        batch = replay.sample(cfg.batch_size, cfg.seq_len)
        data = {k: torch.as_tensor(batch[k], device=model.device) for k in ("obs", "action")}
        with torch.no_grad():
            post = agent.world_model.posterior(data)
        m = agent.update_behavior(post)
        record["skipped"] += int(m["actor_skipped"])
        if "k_action" in m:
            k = m["k_action"].double().cpu().numpy()
            k_sum, k_count = (k if k_sum is None else k_sum + k), k_count + 1
        record["update"] += 1
        done_here += 1
        u = record["update"]
        record["seconds"] += time.perf_counter() - t0
        if u % spec.eval_every == 0 or u == spec.updates:
            # the weight profile: the mean over the updates since the last evaluation
            profile = None if k_sum is None else (k_sum / k_count).tolist()
            record["metrics"].append(evaluation(u, profile))
            k_sum, k_count = None, 0
            checkpoint_now()
            if log_every:
                print(f"[{spec.name}] update {u}/{spec.updates} eval return "
                      f"{record['metrics'][-1]['return']:.1f} ({record['seconds'] / u:.2f} s/update)",
                      flush=True)
    return record


_MODELS: Dict = {}  # (run dir, device) -> FrozenModel, per process


def _worker(job) -> Dict:
    model_dir, device, threads, spec, run_dir, log_every = job
    torch.set_num_threads(threads)
    if (model_dir, device) not in _MODELS:
        _MODELS[(model_dir, device)] = FrozenModel(model_dir, device)
    return train_run(_MODELS[(model_dir, device)], spec, run_dir, log_every)


def run_all(model: FrozenModel, specs: Sequence[FrozenSpec], runs: str, workers: int = 1,
            threads: int = 1, log_every: int = 1) -> List[Dict]:
    """Every spec's run (finished ones are read back), `workers` at once in spawned
    processes, each loading the model once; records in the order of `specs`."""
    device = str(model.device)
    _MODELS[(model.run_dir, device)] = model
    jobs = [(model.run_dir, device, threads, s, os.path.join(runs, s.name), log_every) for s in specs]
    return run_jobs(_worker, jobs, workers, lambda rec: FrozenSpec(**rec["spec"]).name)


def summary(records: Sequence[Dict]) -> List[Dict]:
    groups: Dict = {}
    for rec in records:
        s = rec["spec"]
        groups.setdefault((s["horizon"], s["estimator"]), []).append(rec)
    out = []
    for (horizon, est), recs in sorted(groups.items()):
        finals = [r["metrics"][-1]["return"] for r in recs]
        rp = [r["metrics"][-1]["return"] for r in groups.get((horizon, "rp"), [])]
        mean, std = mean_std(finals)
        out.append({"horizon": horizon, "estimator": est, "seeds": len(recs), "final_mean": mean,
                    "final_std": std, "p_vs_rp": welch_p(finals, rp) if est != "rp" else math.nan,
                    "skipped": sum(r["skipped"] for r in recs),
                    "seconds_per_run": sum(r["seconds"] for r in recs) / len(recs)})
    return out


def markdown(records: Sequence[Dict], model: FrozenModel, command: str) -> str:
    spec = records[0]["spec"]
    lines = ["# Behaviour learning in a frozen world model", "", "```bash", command, "```", "",
             f"World model: {model.config['task']} ({model.config['obs']}), trained "
             f"{model.steps} environment steps with {model.config['estimator']} at H = "
             f"{model.config['horizon']}. {spec['updates']} actor and critic updates per run; "
             f"evaluation: {spec['eval_episodes']} episodes, mean action. Final: the last "
             f"evaluation. p: Welch's t-test against rp at the same horizon (two-sided). "
             f"skipped: non-finite actor updates, summed over seeds. Compute: mean wall time "
             f"of the updates per run (evaluations excluded).", "",
             "| H | estimator | seeds | final return (mean +- std) | p vs rp | skipped | s/run |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in summary(records):
        p = "" if math.isnan(r["p_vs_rp"]) else f"{r['p_vs_rp']:.2g}"
        lines.append(f"| {r['horizon']} | {r['estimator']} | {r['seeds']} | {r['final_mean']:.1f} "
                     f"+- {r['final_std']:.1f} | {p} | {r['skipped']} | {r['seconds_per_run']:.0f} |")
    return "\n".join(lines)


def write_csv(records: Sequence[Dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["horizon", "estimator", "seed", "update", "return", "return_std"])
        for rec in records:
            s = rec["spec"]
            for m in rec["metrics"]:
                w.writerow([s["horizon"], s["estimator"], s["seed"], m["update"], m["return"],
                            m["return_std"]])


def plot(records: Sequence[Dict], path: str, weights_path: str) -> None:
    horizons = sorted({r["spec"]["horizon"] for r in records})
    names = list(dict.fromkeys(r["spec"]["estimator"] for r in records))
    panels, profiles = [], []
    for H in horizons:
        curves = {}
        for est in names:
            recs = [r for r in records if (r["spec"]["horizon"], r["spec"]["estimator"]) == (H, est)]
            if recs:
                n = min(len(r["metrics"]) for r in recs)
                curves[est] = ([m["update"] for m in recs[0]["metrics"][:n]],
                               [[m["return"] for m in r["metrics"][:n]] for r in recs])
        panels.append((f"H = {H}", curves))
        tpx = [r for r in records if (r["spec"]["horizon"], r["spec"]["estimator"]) == (H, "tpx")]
        late = [m["k_action"] for r in tpx for m in r["metrics"]
                if "k_action" in m and m["update"] > 0.75 * r["spec"]["updates"]]
        if late:
            profiles.append((f"tpx, H = {H}", {"action": np.mean(np.array(late), axis=0)}))
    plot_seed_bands(panels, path, "update", "evaluation return")
    if profiles:
        plot_profiles(profiles, weights_path, log=True)


def main(argv=None) -> List[Dict]:
    p = Parser(prog="python -m tpx_ext.frozen", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, metavar="RUN_DIR", help="a trained Dreamer run")
    p.add_argument("--horizons", type=int, nargs="+", default=[15, 100, 200, 300])
    # the knob-free estimators and variants: a run takes no estimator_args (mix would need rho)
    p.add_argument("--estimators", nargs="+", default=["rp", "tpx"],
                   choices=[e for e in configs.ESTIMATORS if e != "mix"])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--updates", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--workers", type=int, default=1, help="runs at once, in processes")
    p.add_argument("--runs", default="runs/frozen", help="the resumable runs")
    p.add_argument("--out", default="frozen", help="writes OUT.csv, OUT.md, OUT.png, OUT_weights.png")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    a = p.parse_args(argv)
    for name, value in (("seeds", a.seeds), ("updates", a.updates), ("eval-every", a.eval_every),
                        ("eval-episodes", a.eval_episodes), ("workers", a.workers),
                        ("threads", a.threads)):
        if value < 1:
            p.error(f"--{name} must be >= 1, got {value}")
    if any(H < 1 for H in a.horizons):
        p.error(f"--horizons must be >= 1, got {a.horizons}")
    torch.set_num_threads(a.threads)
    try:
        model = FrozenModel(a.model, resolve_device(a.device))
    except (FileNotFoundError, ValueError) as exc:  # missing, or not a Dreamer run
        p.error(f"--model: {exc}")
    specs = [FrozenSpec(H, est, seed, a.updates, a.eval_every, a.eval_episodes)
             for H in a.horizons for seed in range(a.seeds) for est in a.estimators]
    print(f"{len(specs)} runs in {a.runs} ({a.workers} at once), world model of {a.model} "
          f"({model.config['task']}, {model.steps} env steps)", flush=True)
    records = run_all(model, specs, a.runs, a.workers, a.threads, 0 if a.quiet else 1)
    out_dir = os.path.dirname(a.out)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    command = "python -m tpx_ext.frozen " + " ".join(argv if argv is not None else sys.argv[1:])
    with open(a.out + ".md", "w") as f:
        f.write(markdown(records, model, command) + "\n")
    write_csv(records, a.out + ".csv")
    plot(records, a.out + ".png", a.out + "_weights.png")
    print(markdown(records, model, command))
    print(f"wrote {a.out}.md, {a.out}.csv, {a.out}.png and {a.out}_weights.png")
    return records


if __name__ == "__main__":
    main()
