"""`python -m tpx_ext.sweep` end to end on a local Ray (debug preset, seconds per trial): a
failing trial, resuming a stopped run, skipping finished ones, the summary against the runs'
own files, and the refusals."""

import csv
import json
import os
import re
import statistics
import sys
import time

import pytest

from tpx_ext.experiments import sweep
from tpx_ext.dreamer import train
from tpx_ext.dreamer.logger import read_metrics

GRID = ["--tasks", "cartpole_balance", "--estimators", "rp", "tpx", "--horizons", "5",
        "--seeds", "0", "--configs", "debug", "--steps", "400"]
SUMMARIES = ("summary.md", "summary.csv", "summary_groups.csv", "curves_cartpole_balance.png")


def snapshot(out):
    """Every file under out: the bytes of the summaries (rewritten on every run), the
    modification time of the others (the runs' files)."""
    state = {}
    for root, _, files in os.walk(out):
        for name in files:
            path = os.path.join(root, name)
            state[path] = open(path, "rb").read() if name in SUMMARIES else os.stat(path).st_mtime_ns
    return state


def check_summary(out, runs):
    """summary.csv and summary_groups.csv against each run's metrics.jsonl."""
    rows = list(csv.DictReader(open(os.path.join(out, "summary.csv"))))
    groups = list(csv.DictReader(open(os.path.join(out, "summary_groups.csv"))))
    md = open(os.path.join(out, "summary.md")).read()
    assert [(r["estimator"], r["horizon"], r["seed"]) for r in rows] == [("rp", "5", "0"), ("tpx", "5", "0")]
    for row, group, run in zip(rows, groups, runs):
        recs = read_metrics(os.path.join(run, "metrics.jsonl"))
        last_train = [r for r in recs if "train_return" in r][-1]
        last_eval = [r for r in recs if "eval_return" in r][-1]
        assert row["status"] == "done"
        assert float(row["eval_return"]) == last_eval["eval_return"]
        assert int(row["env_steps"]) == last_eval["step"] == last_train["step"] == 400
        assert last_train["updates"] > 0
        assert float(row["actor_skipped_frac"]) == last_train["actor_skipped"] / last_train["updates"]
        assert float(row["actor_clipped_frac"]) == last_train["actor_clipped"] / last_train["updates"]
        norms = [r["actor_grad_norm"] for r in recs if "actor_grad_norm" in r]
        assert norms and float(row["actor_grad_norm"]) == statistics.median(norms)
        ks = [r["k_action"] for r in recs if "k_action" in r]
        if row["estimator"] == "rp":
            assert not ks and row["k_lr_first"] == row["k_lr_last"] == ""
        else:  # one training record with updates: the last 10% of them is that one
            assert len(ks) == 1 and len(ks[0]) == 5
            assert float(row["k_lr_first"]) == pytest.approx(ks[0][0], rel=1e-12)
            assert float(row["k_lr_last"]) == pytest.approx(ks[0][-1], rel=1e-12)
        assert group["estimator"] == row["estimator"] and group["seeds"] == "1"
        assert float(group["eval_return_mean"]) == float(row["eval_return"])
        assert float(group["eval_return_std"]) == 0.0
        assert (f"| cartpole_balance | {row['estimator']} | 5 | 0 | done | "
                f"{last_eval['eval_return']:.1f} | 400 |") in md
    assert os.path.getsize(os.path.join(out, "curves_cartpole_balance.png")) > 1000


def test_sweep_fails_resumes_skips_and_summarizes(tmp_path, capsys):
    out = str(tmp_path / "sweep")
    argv = ["--out", out, *GRID]
    rp, tpx = (os.path.join(out, f"cartpole_balance_{e}_h5_s0") for e in ("rp", "tpx"))
    # The tpx trial was stopped at 200 of its 400 steps: the sweep must resume it.
    train.main(["--configs", "debug", "--logdir", tpx, "--quiet", "--threads", "1", "--task",
                "cartpole_balance", "--estimator", "tpx", "--horizon", "5", "--seed", "0",
                "--steps", "200"])
    # A file where the rp trial's run dir goes makes that trial fail.
    open(rp, "w").close()

    assert sweep.main(argv) == 1
    log = capsys.readouterr()
    assert "cartpole_balance_rp_h5_s0 FAILED: NotADirectoryError" in log.out
    assert re.search(r"\[2/2\] cartpole_balance_tpx_h5_s0: eval return -?[\d.]+ in [\d.]+ s", log.out)
    assert "cartpole_balance_rp_h5_s0 failed:" in log.err and "1/2 trials failed" in log.err
    evals = [r["step"] for r in read_metrics(os.path.join(tpx, "metrics.jsonl")) if "eval_return" in r]
    assert evals == [0, 200, 400], "the stopped run was not resumed"
    assert "| rp | 5 | 0 | failed | - |" in open(os.path.join(out, "summary.md")).read()

    # Re-run: the failed trial runs again, the finished one is left alone.
    os.remove(rp)
    tpx_files = snapshot(tpx)
    assert sweep.main(argv) == 0
    log = capsys.readouterr().out
    assert "1/2 trials already finished, skipped" in log
    assert re.search(r"\[2/2\] cartpole_balance_rp_h5_s0: eval return", log)
    assert snapshot(tpx) == tpx_files
    check_summary(out, [rp, tpx])

    # Re-run with everything finished: no Ray, no training, the same files.
    before, t0 = snapshot(out), time.perf_counter()
    assert sweep.main(argv) == 0
    seconds = time.perf_counter() - t0
    assert "2/2 trials already finished, skipped" in capsys.readouterr().out
    assert seconds < 10, f"a sweep with nothing to do took {seconds:.1f} s"
    assert snapshot(out) == before

    # Part of the grid: nothing to run, and the summaries still cover the whole grid.
    assert sweep.main([*argv, "--estimators", "tpx"]) == 0
    assert "1/1 trials already finished, skipped" in capsys.readouterr().out
    assert snapshot(out) == before

    # Other shared settings would mix configs under the same run dir names: refused.
    refused(capsys, lambda: sweep.main([*argv, "--steps", "500"]), r"other settings .*steps: 400 -> 500")
    assert snapshot(out) == before

    # The grid grows: only the new trial runs, and OUT's grid becomes the union.
    assert sweep.main([*argv, "--estimators", "lr"]) == 0
    assert "[1/1] cartpole_balance_lr_h5_s0: eval return" in capsys.readouterr().out
    assert json.load(open(os.path.join(out, "sweep.json")))["estimators"] == ["rp", "tpx", "lr"]
    after = snapshot(out)
    assert all(after[p] == t for p, t in before.items()
               if os.path.basename(p) not in (*SUMMARIES, "sweep.json")), "finished trials touched"
    rows = list(csv.DictReader(open(os.path.join(out, "summary.csv"))))
    assert [(r["estimator"], r["status"]) for r in rows] == [("rp", "done"), ("tpx", "done"),
                                                             ("lr", "done")]

    # --summary: the whole grid from sweep.json, nothing run, no run dir touched.
    os.remove(os.path.join(out, "summary.md"))
    assert sweep.main(["--out", out, "--summary"]) == 0
    printed = capsys.readouterr().out
    assert "| cartpole_balance | lr | 5 | 0 | done |" in printed
    assert open(os.path.join(out, "summary.md")).read() in printed
    assert all(snapshot(out)[p] == t for p, t in after.items()
               if os.path.basename(p) not in SUMMARIES)


def refused(capsys, call, match, others=False):
    """The command ends as argparse does on a bad option: one line on stderr, exit status 2
    (`others`: after what Ray itself logs while it shuts down)."""
    with pytest.raises(SystemExit) as exc:
        call()
    err = capsys.readouterr().err
    line = err.splitlines()[-1] if others else err
    assert exc.value.code == 2 and re.search(match, line), err
    assert line.startswith("python -m tpx_ext.sweep: error: ") and (others or err.count("\n") == 1), err


@pytest.mark.parametrize("args,match", [
    (["--set", "horizon=3"], "set by the sweep itself"),
    (["--set", "batch_size"], "expected KEY=VALUE"),
    (["--set", "no_such_key=1"], "unknown config key"),
    (["--set", "mix_rho=2"], "config key 'mix_rho' is now estimator_args.rho"),
    (["--estimators", "rp", "mix", "--set", "estimator_args.rho=2"], r"rho must be a number in \[0, 1\]"),
    (["--estimators", "rp", "tpx", "--set", "estimator_args.rho=0.3"], "no estimator of the grid"),
    (["--estimators", "mix"], "rho is required by mode 'mix'"),
    (["--estimators", "rp", "tp"], "estimator must be one of"),
    (["--seeds", "0", "0"], "duplicate values"),
    (["--tasks", "cartpole_nope"], "unknown \\['cartpole_nope'\\]"),
    (["--cpus-per-trial", "0"], "must be >= 1"),
])
def test_invalid_sweep_is_refused_before_anything_is_written(tmp_path, capsys, args, match):
    out = str(tmp_path / "s")
    refused(capsys, lambda: sweep.main(["--out", out, *GRID, *args]), match)
    assert not os.path.exists(out)


def test_trial_larger_than_any_node_is_refused(tmp_path, capsys):
    refused(capsys, lambda: sweep.main(["--out", str(tmp_path / "s"), *GRID, "--cpus-per-trial", "4096"]),
            "no Ray node has the 4096 CPUs and 0 GPUs a trial asks for", others=True)


def test_missing_ray_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    refused(capsys, lambda: sweep.main(["--out", str(tmp_path / "s"), *GRID]),
            re.escape('pip install --no-build-isolation ".[experiments]"'))
    assert not os.path.exists(tmp_path / "s")


def test_summary_marks_a_stopped_trial_incomplete(tmp_path):
    """A trial with a checkpoint short of --steps is 'incomplete' (a re-run resumes it), not
    'failed', and stays out of the over-seeds statistics."""
    from tpx_ext.dreamer.train import main as train

    out = str(tmp_path / "sweep")
    trial = sweep.Trial("cartpole_balance", "tpx", 5, 0)
    train(["--configs", "debug", "--logdir", os.path.join(out, trial.name), "--quiet",
           "--threads", "1", "--estimator", "tpx", "--horizon", "5", "--steps", "200"])
    row = sweep.trial_row(out, trial, steps=400)
    assert row["status"] == "incomplete" and row["env_steps"] == 200
    assert sweep.group_rows([row])[0]["seeds"] == 0
    assert sweep.trial_row(out, sweep.Trial("cartpole_balance", "rp", 5, 0), 400)["status"] == "not run"


def test_groups_compare_each_estimator_with_rp_by_welch_test():
    """vs_rp_* holds the difference of means and Welch's two-sided p. For returns 4,5,6
    against 1,2,3: t = 3 / sqrt(1/3 + 1/3) = 3.674 with 4 degrees of freedom (equal sample
    variances), p = 0.02131 from the t distribution. No comparison for rp itself, below 2
    finished seeds, or where both sides are constant."""
    def rows(est, h, returns, status="done"):
        return [{"task": "t", "estimator": est, "horizon": h, "seed": i, "status": status,
                 "eval_return": x} for i, x in enumerate(returns)]

    groups = {(g["estimator"], g["horizon"]): g for g in sweep.group_rows(
        rows("rp", 15, [1.0, 2.0, 3.0]) + rows("tpx", 15, [4.0, 5.0, 6.0])
        + rows("rp", 200, [1.0, 2.0]) + rows("tpx", 200, [7.0]) + rows("tpx", 200, [9.0], "incomplete")
        + rows("rp", 50, [2.0, 2.0]) + rows("lr", 50, [3.0, 3.0]))}
    tpx = groups[("tpx", 15)]
    assert tpx["vs_rp_diff"] == pytest.approx(3.0)
    assert tpx["vs_rp_p"] == pytest.approx(0.02131, abs=5e-5)
    assert groups[("rp", 15)]["vs_rp_diff"] is None
    assert groups[("tpx", 200)]["seeds"] == 1 and groups[("tpx", 200)]["vs_rp_p"] is None
    assert groups[("lr", 50)]["vs_rp_diff"] == 1.0 and groups[("lr", 50)]["vs_rp_p"] is None
    md = sweep.markdown({"configs": [], "set": {}, "steps": 1}, [], list(groups.values()))
    assert "| t | tpx | 15 | 5.0 +- 0.8 | 3 | +3.0 (p = 0.021) |" in md


def test_summary_needs_a_sweep_and_a_run_needs_the_grid(tmp_path, capsys):
    refused(capsys, lambda: sweep.main(["--out", str(tmp_path / "none"), "--summary"]), "holds no sweep")
    with pytest.raises(SystemExit):
        sweep.main(["--out", str(tmp_path / "s"), "--tasks", "cartpole_balance"])
    assert "the grid needs --estimators, --horizons, --seeds" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "s") and not os.path.exists(tmp_path / "none")
