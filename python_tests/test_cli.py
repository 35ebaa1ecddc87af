"""Every command reports a user's mistake as argparse does: one line, exit status 2, no
traceback (the trainer's and the sweep's own cases: test_train.py, test_sweep.py)."""

import subprocess
import sys

import pytest

from tpx_ext.dreamer import plot
from tpx_ext.experiments import control, frozen, gradvar


@pytest.fixture
def foreign(tmp_path):
    """A directory that looks like a run but holds another program's checkpoint."""
    d = tmp_path / "foreign"
    d.mkdir()
    (d / "checkpoint.pt").write_bytes(b"\x80\x04not a checkpoint")
    (d / "config.json").write_text("{}")
    return str(d)


def refused(capsys, main, argv, prog, match):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert err.startswith(f"python -m tpx_ext.{prog}: error: ") and err.count("\n") == 1, err
    assert match in err, err


@pytest.mark.parametrize("argv, match", [
    (["--reps", "0"], "--reps must be >= 1"),
    (["--horizons", "0"], "--horizons >= 1"),
    (["--modes", "mix", "--rho", "2"], "rho must be a number in [0, 1]"),
    (["--modes", "tpx", "--momentum", "1"], "momentum must be a number in [0, 1)"),
    (["--modes", "nope"], "invalid choice: 'nope'"),
    (["--checkpoint", "NOWHERE"], "--checkpoint: NOWHERE holds no Dreamer run"),
])
def test_gradvar(capsys, argv, match):
    refused(capsys, gradvar.main, argv, "gradvar", match)


def test_gradvar_and_frozen_refuse_a_foreign_run(capsys, foreign):
    refused(capsys, gradvar.main, ["--checkpoint", foreign, "--modes", "rp"], "gradvar",
            "is not a checkpoint this trainer can read")
    refused(capsys, frozen.main, ["--model", foreign], "frozen",
            "is not a checkpoint this trainer can read")
    refused(capsys, frozen.main, ["--model", foreign, "--workers", "0"], "frozen",
            "--workers must be >= 1")


def test_plot_and_control(capsys, tmp_path):
    refused(capsys, plot.main, [str(tmp_path / "none")], "plot", str(tmp_path / "none"))
    refused(capsys, plot.main, [str(tmp_path), "--labels", "a", "b"], "plot",
            "--labels: got 2 labels for 1 runs")
    refused(capsys, control.main, ["--iters", "0"], "control", "--iters must be >= 1")


def test_a_real_process_prints_one_line_and_exits_2():
    out = subprocess.run([sys.executable, "-m", "tpx_ext.train", "--horizon", "0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == "python -m tpx_ext.train: error: horizon must be >= 1, got 0\n"
