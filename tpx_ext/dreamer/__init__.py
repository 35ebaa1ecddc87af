"""The Dreamer agent (DreamerV1/V2 for continuous control) with its actor trained through
the estimator API (`rp` = Dreamer's dynamics backprop, `lr`, `mix`, `tpx`).

`networks.py` holds the encoders, decoders and heads, `rssm.py` the latent dynamics,
`world_model.py` the model and its loss, `behavior.py` imagination with the actor and
critic, `agent.py` the whole agent. Shape symbols: docs/tensor_shapes.md.
"""

from .agent import Dreamer
from .behavior import ActorCritic
from .rssm import RSSM, LatentState
from .world_model import WorldModel

__all__ = ["Dreamer", "ActorCritic", "LatentState", "RSSM", "WorldModel"]
