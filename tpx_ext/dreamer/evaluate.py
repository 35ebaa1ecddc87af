"""Evaluate a saved agent without training it: returns over N episodes, a GIF, and for pixel
runs the world model's open-loop predictions beside the real frames.

    python -m tpx_ext.evaluate runs/default --episodes 10
    python -m tpx_ext.evaluate runs/walker --gif walker.gif --openloop openloop.gif

Loads the run's checkpoint read-only (nothing in the run directory changes), runs the
episodes one after another on an environment seeded with --seed (mean action, or --sample
for the policy's samples), prints the mean +- std and writes the returns as JSON (--out).
"""

import json
import os
from typing import Dict, List, Optional

import numpy as np
import torch

from ..cli import Parser, UsageError
from . import checkpoint
from .logger import save_gif
from .networks import pixel_target
from .rssm import LatentState
from .train import evaluate, load_run, resolve_device

CONTEXT, OPENLOOP = 5, 45  # open-loop video: frames given to the model, frames it predicts


@torch.no_grad()
def openloop_frames(agent, replay, sequences: int = 4, seed: int = 0) -> List[np.ndarray]:
    """[3, 3 x 64, sequences x 64] uint8 frames: per replay sequence (columns) the real
    frames, the model's (posterior reconstructions for CONTEXT frames, then its prior
    rolled forward with the real actions, no observations) and their difference (rows)."""
    wm = agent.world_model
    replay.reseed(seed)
    batch = replay.sample(sequences, CONTEXT + OPENLOOP)
    obs = torch.as_tensor(batch["obs"], device=agent.device)
    action = torch.as_tensor(batch["action"], device=agent.device)
    post = wm.posterior({"obs": obs[:, :CONTEXT], "action": action[:, :CONTEXT]})
    feats = [post.feat]  # [B, CONTEXT, F]
    state = post.map(lambda x: x[:, -1])
    for t in range(CONTEXT, CONTEXT + OPENLOOP):
        deter = wm.rssm.deter_step(state.stoch, action[:, t], state.deter)
        mean, std = wm.rssm.prior(deter)
        state = LatentState(mean, std, mean, deter)  # the prior's mean: one clear prediction
        feats.append(state.feat[:, None])
    model = wm.decoder(torch.cat(feats, 1))  # [B, T, 3, 64, 64] in pixel_target's scale
    truth = pixel_target(obs)
    rows = [truth, model, (model - truth).abs() - 0.5]
    video = torch.cat([torch.cat(list(r), -1) for r in rows], -2)  # [T, 3, 3 x 64, B x 64]
    # (video + 0.5) * 255 undoes pixel_target; the error row shows |model - truth|.
    return list(((video + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())


def main(argv: Optional[List[str]] = None) -> Dict:
    p = Parser(prog="python -m tpx_ext.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run directory of python -m tpx_ext.train")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--sample", action="store_true",
                   help="act with the policy's samples (and exploration noise) instead of its mean")
    p.add_argument("--seed", type=int, default=0, help="environment seed of the first episode")
    p.add_argument("--gif", help="write the first episode as a GIF")
    p.add_argument("--openloop", metavar="GIF",
                   help=f"pixel runs: {CONTEXT} frames observed, then {OPENLOOP} predicted open-loop, "
                        "beside the real frames")
    p.add_argument("--out", help="write the result (returns, mean, std) to this JSON file")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    if a.episodes < 1:
        p.error(f"--episodes must be >= 1, got {a.episodes}")
    with p.reporting(FileNotFoundError, ValueError):
        if not checkpoint.exists(a.run_dir):
            raise UsageError(f"{a.run_dir} holds no run of python -m tpx_ext.train (no "
                             f"{checkpoint.CHECKPOINT_FILE})")
        agent, replay, cfg, steps = load_run(a.run_dir, resolve_device(a.device))
        if a.openloop and cfg.obs != "pixels":
            raise UsageError("--openloop needs a run from pixels (obs pixels); this run is from "
                             "states")
    agent.eval()
    returns, frames = evaluate(agent, cfg, a.seed, a.episodes, frames=bool(a.gif), explore=a.sample)
    result = {"run_dir": a.run_dir, "task": cfg.task, "env_steps": steps, "episodes": a.episodes,
              "action": "sampled" if a.sample else "mean", "seed": a.seed, "returns": returns,
              "mean": float(np.mean(returns)), "std": float(np.std(returns))}
    print(f"eval return: {result['mean']:.1f} +- {result['std']:.1f} ({a.episodes} episodes, "
          f"{result['action']} action) of {a.run_dir} after {steps} env steps", flush=True)
    if a.gif:
        save_gif(a.gif, frames)
        print(f"wrote {a.gif}")
    if a.openloop:
        save_gif(a.openloop, openloop_frames(agent, replay, seed=a.seed), fps=10)
        print(f"wrote {a.openloop}")
    if a.out:
        if os.path.dirname(a.out):
            os.makedirs(os.path.dirname(a.out), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {a.out}")
    return result


if __name__ == "__main__":
    main()
