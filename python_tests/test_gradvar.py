"""python -m tpx_ext.gradvar on a tiny configuration."""

import csv

import pytest
import torch

from tpx_ext import MODES, gradvar

TINY = ["--horizons", "1", "3", "--batch", "8", "--reps", "3", "--ref-batches", "4",
        "--hidden", "4", "--no-progress"]


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()  # main() sets its --threads
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("system", ["rotor", "linear"])
def test_gradvar_writes_table_csv_and_png(system, tmp_path, capsys):
    out = tmp_path / "gv"
    gradvar.main(TINY + ["--system", system, "--out", str(out)])

    with open(f"{out}.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["horizon"]), r["mode"]) for r in rows] == [(H, m) for H in (1, 3) for m in MODES]
    for r in rows:
        var, err = float(r["variance"]), float(r["error"])
        assert 0 < var < float("inf") and float(r["ms_per_grad"]) > 0
        # mean squared distance from any point >= from the sample mean
        assert err**2 >= var * (3 - 1) / 3 * (1 - 1e-9)
        if system == "linear":
            assert r["reference"] == "exact" and float(r["ref_stderr"]) == 0.0
        else:
            assert r["reference"] in ("rp", "lr") and float(r["ref_stderr"]) > 0
    assert (tmp_path / "gv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert all(f"   3 {m:>4} " in table for m in MODES)


def test_gradvar_rejects_unknown_names():
    with pytest.raises(ValueError, match="valid modes"):
        gradvar.run(modes=["rp", "sf"], horizons=[1], reps=2, progress=False)
    with pytest.raises(ValueError, match="valid: rotor, linear"):
        gradvar.run(system_name="cartpole", horizons=[1], reps=2, progress=False)


def test_gradvar_on_a_dreamer_checkpoint(tmp_path):
    """The study on a trained agent: rows for every mode and horizon, finite statistics, a
    reference from rp or lr, and a clear refusal of tp (it needs a small toy policy)."""
    from tpx_ext.train import main as train

    run_dir = str(tmp_path / "run")
    train(["--configs", "debug", "--logdir", run_dir, "--quiet", "--threads", "1", "--steps", "400"])
    rows = gradvar.run(horizons=(3, 12), modes=("rp", "lr", "tpx"), batch=32, reps=4,
                       ref_batches=6, progress=False, checkpoint=run_dir)
    assert [(r["horizon"], r["mode"]) for r in rows] == [
        (3, "rp"), (3, "lr"), (3, "tpx"), (12, "rp"), (12, "lr"), (12, "tpx")]
    for r in rows:
        assert r["system"].startswith("dreamer:") and r["reference"] in ("rp", "lr")
        assert 0 < r["variance"] < float("inf") and r["nonfinite"] == 0
    # Same seed, same gradients: the study is reproducible.
    again = gradvar.run(horizons=(3,), modes=("rp", "lr", "tpx"), batch=32, reps=4,
                        ref_batches=6, progress=False, checkpoint=run_dir)
    assert [r["variance"] for r in again] == [r["variance"] for r in rows[:3]]
    with pytest.raises(ValueError, match="leave it out with --checkpoint"):
        gradvar.run(horizons=(3,), modes=("tp",), progress=False, checkpoint=run_dir)
