"""The Dreamer application: the agent (DreamerV1/V2 for continuous control) with its actor
trained through the estimator API (`rp` = Dreamer's dynamics backprop, `lr`, `mix`, `tpx`),
and what trains it. Needs the `dreamer` extra (tpx_ext/extras.py).

The agent: `networks.py` (encoders, decoders, heads), `rssm.py` (latent dynamics),
`world_model.py` (the model and its loss), `behavior.py` (imagination with the actor and
critic), `agent.py` (the whole agent). Training: `configs.py` (presets), `train.py` (the
trainer, `python -m tpx_ext.train`), `envs.py` (dm_control tasks; `rendering.py` picks their OpenGL backend), `replay.py`,
`checkpoint.py` with `atomic.py` (exact resume), `logger.py`, `plot.py`. Shape symbols:
docs/tensor_shapes.md.
"""

from .agent import Dreamer
from .behavior import ActorCritic
from .rssm import RSSM, LatentState
from .world_model import WorldModel

__all__ = ["Dreamer", "ActorCritic", "LatentState", "RSSM", "WorldModel"]
