"""The presets against the setups they claim to be, and the validation of config values."""

import dataclasses
import json
import os
import math
import re

import pytest

from tpx_ext.dreamer import configs

# DreamerV1's DMC setup (danijar/dreamer: dreamer.py define_config, models.py), written out
# here independently of tpx_ext/configs.py, as this project's keys: a preset that drifts
# from it fails. V1's name of each value is in the comment.
DREAMERV1 = {
    "estimator": "rp",             # dynamics backprop
    "action_repeat": 2,            # action_repeat
    "episode_length": 0,           # time_limit 1000 (0: the suite's 1000)
    "steps": 5_000_000,            # steps 5e6
    "prefill": 5_000,              # prefill
    "train_every": 1_000,          # train_every
    "train_steps": 100,            # train_steps
    "pretrain": 100,               # pretrain
    "batch_size": 50,              # batch_size
    "seq_len": 50,                 # batch_length
    "stoch": 30,                   # stoch_size
    "deter": 200,                  # deter_size
    "hidden": 400,                 # num_units
    "rssm_hidden": 200,            # RSSM(stoch_size, deter_size, deter_size)
    "reward_layers": 2,            # DenseDecoder((), 2, num_units)
    "critic_layers": 3,            # value: DenseDecoder((), 3, num_units)
    "actor_layers": 4,             # ActionDecoder(actdim, 4, num_units)
    "cnn_depth": 32,               # cnn_depth
    "cnn_act": "relu",             # cnn_act
    "latent_min_std": 0.1,         # softplus(std) + 0.1
    "kl_balance": 0.0,             # kl_divergence(post, prior): no balancing
    "free_nats": 3.0,              # free_nats
    "kl_scale": 1.0,               # kl_scale
    "model_lr": 6e-4,              # model_lr
    "actor_lr": 8e-5,              # actor_lr
    "critic_lr": 8e-5,             # value_lr
    "adam_eps": 1e-7,              # tf.optimizers.Adam's default epsilon
    "grad_clip": 100.0,            # grad_clip
    "horizon": 15,                 # horizon
    "gamma": 0.99,                 # discount (pcont False: a constant)
    "lam": 0.95,                   # disclam
    "actor_weights": "discount",   # actor_loss = -mean(discount * returns)
    "imag_starts": 0,              # imagines from every posterior state
    "latent_nodes": False,
    "actor_entropy": 0.0,          # no entropy term
    "actor_init_std": 5.0,         # action_init_std
    "actor_min_std": 1e-4,         # ActionDecoder min_std
    "actor_mean_scale": 5.0,       # ActionDecoder mean_scale
    "actor_state_grad": False,     # actor(tf.stop_gradient(feat))
    "expl_noise": 0.3,             # expl additive_gaussian, expl_amount (expl_decay, expl_min 0)
    "slow_critic_every": 0,        # the value net's own predictions are the targets
}


@pytest.mark.parametrize("preset,obs", [("dmc_vision", "pixels"), ("dmc_proprio", "state")])
def test_dmc_presets_are_dreamerv1(preset, obs):
    cfg = configs.build([preset], {})
    assert cfg.obs == obs
    # V1's values, with its "all posterior states" as the number build resolves it to
    v1 = configs.resolve_derived(dataclasses.replace(configs.Config(), **DREAMERV1))
    drift = {k: (getattr(cfg, k), getattr(v1, k)) for k in DREAMERV1 if getattr(cfg, k) != getattr(v1, k)}
    assert not drift, f"{preset} differs from DreamerV1 in (preset, V1): {drift}"
    # V1 keeps every episode: the replay must hold the whole run (one extra step per episode).
    episodes = cfg.steps // 1000
    assert cfg.replay_capacity >= cfg.steps // cfg.action_repeat + episodes


def test_horizon_gpu_is_dreamerv1_from_pixels_for_500k_steps():
    """Stacked on dmc_vision it changes the run length and the evaluation/checkpoint
    schedule only; every training value stays DreamerV1's."""
    base = dataclasses.asdict(configs.build(["dmc_vision"], {}))
    stacked = dataclasses.asdict(configs.build(["dmc_vision", "horizon_gpu"], {}))
    changed = {k for k in base if base[k] != stacked[k]}
    assert changed == {"steps", "eval_every", "checkpoint_every"}
    assert stacked["steps"] == 500_000 and stacked["obs"] == "pixels"
    assert stacked["replay_capacity"] >= stacked["steps"] // stacked["action_repeat"]


def test_dreamerv2_choices_are_the_cpu_defaults():
    """The preset holds the DreamerV2-style values of the CPU default, so stacking it on a
    dmc preset reproduces those choices at that scale."""
    default = configs.Config()
    preset = configs.PRESETS["dreamerv2_choices"]
    assert {k: getattr(default, k) for k in preset} == preset
    stacked = configs.build(["dmc_vision", "dreamerv2_choices"], {})
    assert stacked.kl_balance == 0.8 and stacked.slow_critic_every == 100
    assert stacked.batch_size == 50 and stacked.obs == "pixels"


def test_cpu_default_matches_its_documented_run():
    """docs/results/cpu_default/ holds the config of the documented run (989 evaluation
    return): the defaults must still be that config, and every key added since must default
    to the behaviour that run had, or be named with the value that reproduces it."""
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "results", "cpu_default",
                        "config.json")
    with open(path) as f:
        documented = json.load(f)
    saved = configs.from_saved(documented)  # its tpx_* keys are estimator_args now
    default = dataclasses.asdict(configs.Config())
    # keys added after that run, whose defaults are what the run did
    added = {"precision": "32", "envs": 1}
    assert set(default) - set(saved) == set(added) and not set(saved) - set(default)
    assert {k: default[k] for k in added} == added
    saved.update(added)
    assert {k: v for k, v in saved.items() if k != "estimator_args"} == \
        {k: v for k, v in default.items() if k != "estimator_args"}
    # Its knobs were the library's defaults then, and the weight rule's default changed
    # since: the README names the variant that reproduces it (the coordinate-wise weights).
    then = configs.estimator_knobs(configs.build([], {**saved, "estimator": "tpx-coord"}))
    assert then == {**configs.estimator_knobs(configs.build([], saved)), "weights": "coordinate"}
    assert configs.estimator_knobs(configs.Config())["weights"] == "matrix"
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    assert "--estimator tpx-coord" in readme


_AT_LEAST_ONE = "batch_size and seq_len must be >= 1"
_SCHEDULE = "train_every and train_steps must be >= 1"
_EVALUATION = "eval_every, checkpoint_every and eval_episodes must be >= 1"
_KL_BALANCE = ("kl_balance must be 0 (no balancing: plain KL, DreamerV1) or in (0, 1) "
               "(DreamerV2's balancing), got ")
_LAYERS = ("rssm_hidden, reward_layers, actor_layers and critic_layers must be >= 0 (0: the "
           "hidden / mlp_layers value)")


@pytest.mark.parametrize("key,value,message", [
    ("obs", "rgb", "obs must be 'state' or 'pixels', got 'rgb'"),
    ("precision", "8", "precision must be one of 32, bf16, 16, got '8'"),
    ("estimator", "tp", "estimator must be one of rp, lr, mix, tpx, tpx-coord, tpx-paper, "
     "tpx-loo, got 'tp' (tp forms per-sample parameter gradients, B x P: use it through "
     "tpx_ext.Estimator on small models)"),
    ("horizon", "0", "horizon must be >= 1, got 0"),
    ("action_repeat", "0", "action_repeat must be >= 1, got 0"),
    ("batch_size", "0", _AT_LEAST_ONE),
    ("seq_len", "0", _AT_LEAST_ONE),
    ("train_every", "0", _SCHEDULE),
    ("train_steps", "0", _SCHEDULE),
    ("steps", "0", "steps must be >= 1, got 0"),
    ("envs", "0", "envs must be >= 1, got 0"),
    ("imag_starts", "-1", "imag_starts must be >= 0, got -1"),
    ("episode_length", "-1", "episode_length must be >= 0, got -1"),
    ("eval_every", "0", _EVALUATION),
    ("checkpoint_every", "0", _EVALUATION),
    ("eval_episodes", "0", _EVALUATION),
    ("pretrain", "-5", "pretrain must be >= 0 (0: train_steps), got -5"),
    ("kl_balance", "1.0", _KL_BALANCE + "1.0"),
    ("kl_balance", "-0.2", _KL_BALANCE + "-0.2"),
    ("slow_critic_every", "-1", "slow_critic_every must be >= 0 (0: no slow critic), got -1"),
    ("expl_noise", "-0.1", "expl_noise must be a finite std >= 0, got -0.1"),
    ("expl_noise", "nan", "expl_noise must be a finite std >= 0, got nan"),
    ("expl_noise", "inf", "expl_noise must be a finite std >= 0, got inf"),
    ("actor_min_std", "2.0", "need actor_init_std > actor_min_std > 0, got 1.0, 2.0"),
    ("actor_min_std", "1.0", "need actor_init_std > actor_min_std > 0, got 1.0, 1.0"),
    ("actor_min_std", "0", "need actor_init_std > actor_min_std > 0, got 1.0, 0.0"),
    ("cnn_act", "tanh", "cnn_act must be 'relu' or 'elu', got 'tanh'"),
    ("rssm_hidden", "-1", _LAYERS),
    ("reward_layers", "-1", _LAYERS),
    ("actor_layers", "-1", _LAYERS),
    ("critic_layers", "-1", _LAYERS),
    ("mlp_layers", "0", "mlp_layers must be >= 1, got 0"),
])
def test_invalid_values_are_refused(key, value, message):
    """Each check refuses the first value past its bound, alone (every other value is the
    debug preset's), with its message in full."""
    with pytest.raises(ValueError) as info:
        configs.build(["debug"], {key: value})
    assert str(info.value) == message


@pytest.mark.parametrize("key,value", [
    ("obs", "pixels"), ("cnn_act", "elu"), ("precision", "bf16"), ("estimator", "tpx-loo"),
    ("horizon", 1), ("action_repeat", 1), ("batch_size", 1), ("seq_len", 1),
    ("train_every", 1), ("train_steps", 1), ("steps", 1), ("envs", 1),
    ("episode_length", 0), ("eval_every", 1), ("checkpoint_every", 1), ("eval_episodes", 1),
    ("kl_balance", 0.0), ("kl_balance", 0.5), ("kl_balance", 0.999),
    ("slow_critic_every", 0), ("expl_noise", 0.0), ("expl_noise", 0.3),
    ("actor_min_std", 0.999), ("actor_min_std", 1e-4), ("mlp_layers", 1),
    ("pretrain", 100), ("imag_starts", 1),
])
def test_valid_edge_values_are_accepted(key, value):
    """The bound of each check is accepted (given as text, as on the command line)."""
    assert getattr(configs.build(["debug"], {key: str(value)}), key) == value


def test_zeros_that_stand_for_another_key_are_accepted_and_resolved():
    cfg = configs.build(["debug"], {k: "0" for k in (*configs.DERIVED, "imag_starts")})
    assert (cfg.pretrain, cfg.rssm_hidden, cfg.imag_starts) == (cfg.train_steps, 16, 4 * 8)
    assert cfg.reward_layers == cfg.actor_layers == cfg.critic_layers == cfg.mlp_layers == 2


def _documented_values():
    """(keys, {column: cell}) of every row of docs/DREAMER.md's Values table."""
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "DREAMER.md")
    text = open(path).read()
    table = text[text.index("| key | DreamerV1 |"):].split("\n\n")[0].splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    for line in table[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        yield re.findall(r"`(\w+)`", cells[0]), dict(zip(header, cells))


def _parse_cell(cell: str, n: int):
    """n values from a cell such as "10, 1, 1", "16 x 32", "5M", "8e-5, 8e-5" or "false
    (note)"; None for prose (e.g. "as V1", "any")."""
    cell = re.sub(r"\([^)]*\)", "", cell).replace("`", "").strip()
    parts = [p.strip() for p in re.split(r", | x ", cell)]
    if len(parts) != n:
        return None
    out = []
    for p in parts:
        m = re.fullmatch(r"(-?[\d.]+(?:e-?\d+)?)([kM]?)", p)
        if m:
            out.append(float(m.group(1)) * {"": 1, "k": 1e3, "M": 1e6}[m.group(2)])
        elif p in ("true", "false"):
            out.append(p == "true")
        elif re.fullmatch(r"[a-z_]+", p) and p != "any":
            out.append(p)
        else:
            return None
    return out


def test_presets_are_the_documented_table():
    """Every value docs/DREAMER.md's table gives for the CPU default, the dmc presets and
    dreamerv2_choices is what `build` gives (after resolving the 0-means-another-key keys)."""
    columns = {"CPU default (no preset)": [[]],
               "`dmc_vision` / `dmc_proprio`": [["dmc_vision"], ["dmc_proprio"]],
               "`dreamerv2_choices` on a dmc preset": [["dmc_vision", "dreamerv2_choices"]]}
    checked = 0
    for keys, cells in _documented_values():
        for column, preset_lists in columns.items():
            # "a / b": the first preset's value, then the second's
            options = cells[column].split(" / ") if len(preset_lists) == 2 else [cells[column]]
            for presets, cell in zip(preset_lists, options * len(preset_lists)):
                values = _parse_cell(cell, len(keys)) if keys else None
                if values is None:
                    continue
                cfg = dataclasses.asdict(configs.build(presets, {}))
                for key, value in zip(keys, values):
                    got = cfg[key]
                    assert (got == value if not isinstance(value, float)
                            else math.isclose(got, value)), (presets, key, got, value)
                    checked += 1
    assert checked >= 60, checked  # the table is read, not skipped


def _config_before_estimator_args(**changes):
    """The config.json of a run made before estimator_args (docs/results/cpu_default's, with
    tpx_weights, the last knob key added before the change): every estimator's knobs were
    top-level keys, saved whatever the estimator."""
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "results", "cpu_default",
                        "config.json")
    with open(path) as f:
        saved = json.load(f)
    saved.update({"tpx_weights": "matrix", **changes})
    assert "estimator_args" not in saved and set(configs.RENAMED) <= set(saved)
    return saved


@pytest.mark.parametrize("estimator,args", [
    ("tpx", {"weights": "coordinate", "ucb": 1.0, "momentum": 0.3}),
    ("mix", {"rho": 0.25}),
    ("rp", {}),
])
def test_old_knob_keys_become_the_estimators_args(estimator, args):
    """from_saved moves mix_rho, tpx_weights, tpx_ucb and tpx_momentum into estimator_args,
    those of the saved estimator only (the others were saved but unused); the other keys
    pass unchanged and the result builds into a config with those knobs."""
    saved = _config_before_estimator_args(estimator=estimator, mix_rho=0.25,
                                          tpx_weights="coordinate", tpx_ucb=1.0,
                                          tpx_momentum=0.3)
    out = configs.from_saved(saved)
    assert out["estimator_args"] == args
    assert {k: v for k, v in out.items() if k != "estimator_args"} == \
        {k: v for k, v in saved.items() if k not in configs.RENAMED}
    assert configs.build([], out).estimator_args == args


def test_saved_estimator_args_win_over_old_knob_keys():
    """A saved config that has estimator_args keeps them; the old keys only fill the knobs
    it lacks, and the saved mapping is not modified."""
    saved = {"estimator": "tpx", "estimator_args": {"ucb": 3.0}, "tpx_ucb": 1.0,
             "tpx_momentum": 0.3}
    out = configs.from_saved(saved)
    assert out == {"estimator": "tpx", "estimator_args": {"ucb": 3.0, "momentum": 0.3}}
    assert saved["estimator_args"] == {"ucb": 3.0}


def test_old_knob_keys_without_an_estimator_are_the_default_estimators():
    """A saved config without the estimator key is Config's default estimator (tpx): its
    knobs move, mix's rho is dropped."""
    assert configs.Config.estimator == "tpx"
    assert configs.from_saved({"mix_rho": 0.5, "tpx_ucb": 1.0, "seed": 3}) == \
        {"seed": 3, "estimator_args": {"ucb": 1.0}}


def test_configs_without_old_knob_keys_pass_unchanged():
    saved = dataclasses.asdict(configs.build([], {"estimator": "mix",
                                                  "estimator_args.rho": "0.5"}))
    assert configs.from_saved(saved) == saved
    assert configs.from_saved({"seed": 3}) == {"seed": 3}


def test_knob_values_given_as_text_are_parsed():
    """--estimator_args.KNOB VALUE: a number given as text becomes a float, a word stays a
    string, a value that is not text passes unchanged."""
    cfg = configs.build(["debug"], {"estimator_args.ucb": "1.5",
                                    "estimator_args.weights": "coordinate",
                                    "estimator_args.momentum": 0.25})
    assert cfg.estimator_args == {"ucb": 1.5, "weights": "coordinate", "momentum": 0.25}
    assert type(cfg.estimator_args["ucb"]) is float
    assert configs.parse_knob("2") == 2.0 and configs.parse_knob(True) is True
    assert configs.parse_knob("1e-2") == 0.01 and configs.parse_knob("nan!") == "nan!"


def test_run_name():
    assert configs.run_name("walker_walk", "tpx-coord", 15, 2) == "walker_walk_tpx-coord_h15_s2"
    assert configs.run_name("walker_walk", "rp", 5, 0, obs="pixels") == \
        "walker_walk_pixels_rp_h5_s0"
    assert configs.run_name("walker_walk", "rp", 5, 0, obs="") == "walker_walk_rp_h5_s0"


def test_derived_keys_keep_given_values_and_resolve_zeros():
    """A 0 of a derived key becomes its source key's value, imag_starts 0 the batch's
    batch_size x seq_len posterior states (an int); values given, 1 included, are kept."""
    cfg = configs.build(["debug"], {"mlp_layers": "3", "train_steps": "5", "hidden": "24"})
    assert (cfg.pretrain, cfg.rssm_hidden) == (5, 24)
    assert cfg.reward_layers == cfg.actor_layers == cfg.critic_layers == 3
    assert cfg.imag_starts == 4 * 8 and type(cfg.imag_starts) is int
    given = {"pretrain": 1, "rssm_hidden": 1, "reward_layers": 1, "actor_layers": 4,
             "critic_layers": 1, "imag_starts": 7}
    cfg = configs.build(["debug"], {"mlp_layers": "3", "train_steps": "5", "hidden": "24",
                                    **{k: str(v) for k, v in given.items()}})
    assert {k: getattr(cfg, k) for k in given} == given


@pytest.mark.parametrize("key,text,value", [
    *[("latent_nodes", t, True) for t in ("1", "true", "yes", "on", "True", "ON")],
    *[("latent_nodes", t, False) for t in ("0", "false", "no", "off", "FALSE", "Off")],
    ("horizon", "15", 15), ("horizon", "1e3", 1000), ("steps", "2.5E5", 250_000),
    ("actor_lr", "1e-4", 1e-4), ("actor_lr", "0.5", 0.5), ("gamma", "1", 1.0),
    ("task", "walker_walk", "walker_walk"),
])
def test_override_text_is_parsed_as_the_defaults_type(key, text, value):
    """--KEY VALUE: booleans from 1/true/yes/on and 0/false/no/off in any case, ints also
    in scientific notation, floats and strings as Python reads them."""
    got = getattr(configs.build(["debug"], {key: text}), key)
    assert got == value and type(got) is type(value)


def test_override_values_that_are_not_text_are_converted():
    cfg = configs.build(["debug"], {"horizon": 7.0, "gamma": 1, "latent_nodes": 1})
    assert (cfg.horizon, cfg.gamma, cfg.latent_nodes) == (7, 1.0, True)
    assert (type(cfg.horizon), type(cfg.gamma)) == (int, float)


@pytest.mark.parametrize("overrides,message", [
    ({"latent_nodes": "maybe"}, "--latent_nodes: expected true/false, got 'maybe'"),
    ({"horizon": "ten"}, "--horizon: expected int, got 'ten'"),
    ({"horizon": "1.5"}, "--horizon: expected int, got '1.5'"),
    ({"gamma": "high"}, "--gamma: expected float, got 'high'"),
    ({"tpx_ucb": "1"}, "config key 'tpx_ucb' is now estimator_args.ucb "
                       "(--estimator_args.ucb VALUE)"),
    ({"mix_rho": 0.5}, "config key 'mix_rho' is now estimator_args.rho "
                       "(--estimator_args.rho VALUE)"),
    ({"estimator_args.nope": "1"}, "unknown estimator knob 'nope' in --estimator_args.nope; "
                                   "knobs: rho, weights, ucb, momentum"),
    ({"estimator_args.ucb.x": "1"}, "unknown estimator knob 'ucb.x' in "
                                    "--estimator_args.ucb.x; knobs: rho, weights, ucb, momentum"),
    ({"estimator_args": "ucb=1"}, "estimator_args must be a mapping, got 'ucb=1'"),
    ({"estimator": "mix"}, "estimator_args of estimator 'mix': rho is required by mode 'mix' "
                           "(the weight on LR at every node; a number in [0, 1])"),
    ({"estimator": "rp", "estimator_args.ucb": "1"},
     "estimator_args of estimator 'rp': ucb applies to mode 'tpx' only (mode 'rp')"),
])
def test_bad_overrides_are_refused(overrides, message):
    with pytest.raises(ValueError) as info:
        configs.build(["debug"], overrides)
    assert str(info.value) == message


def test_unknown_keys_and_presets_are_refused_with_the_valid_names():
    with pytest.raises(ValueError) as info:
        configs.build([], {"bogus": "1"})
    assert str(info.value) == ("unknown config key 'bogus'; valid keys: "
                               + ", ".join(dataclasses.asdict(configs.Config())))
    assert ", obs, action_repeat, " in str(info.value)
    with pytest.raises(ValueError) as info:
        configs.build(["debug", "nope"], {})
    assert str(info.value) == ("unknown config preset 'nope'; valid: debug, dmc_vision, "
                               "dmc_proprio, horizon_gpu, dreamerv2_choices")


def test_estimator_args_given_as_a_mapping_replace_the_presets():
    """--estimator_args as a whole (a saved config's mapping) replaces the knobs set so far;
    single knobs after it add to it, and build copies it (the caller's mapping and Config's
    default stay as they were)."""
    args = {"ucb": 1.0}
    cfg = configs.build(["debug"], {"estimator_args.momentum": "0.5", "estimator_args": args,
                                    "estimator_args.weights": "coordinate"})
    assert cfg.estimator_args == {"ucb": 1.0, "weights": "coordinate"}
    assert args == {"ucb": 1.0} and configs.Config().estimator_args == {}
