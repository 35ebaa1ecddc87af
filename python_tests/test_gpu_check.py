"""scripts/gpu_check.sh where there is no GPU: its arguments, the order and recording of its
steps (a dry run; real steps that fail cleanly because torch sees no CUDA; steps left out of
the time budget) and the summary writer, scripts/gpu_summary.py.

Nothing here builds: a run without --skip-build or --dry-run would rebuild the extension in
the checkout. No test name contains the word the GPU check selects its tests by."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = ["build", "selfcheck", "pytest", "bench_ops", "bench_train_step", "dmc_proprio", "dmc_vision"]


def gpu_check(tmp_path, *args, timeout=60):
    # No GPU for torch even where there is one, so the steps fail the same way everywhere.
    env = dict(os.environ, TMPDIR=str(tmp_path), CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=timeout)


def tsv_rows(out):
    lines = (out / "steps.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["step", "status", "rc", "seconds", "limit", "command"]
    return [dict(zip(lines[0].split("\t"), line.split("\t"))) for line in lines[1:]]


def load_summary_module():
    spec = importlib.util.spec_from_file_location("gpu_summary", ROOT / "scripts" / "gpu_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- arguments ------------------------------------------------------------------------

def test_help_names_every_step_and_option(tmp_path):
    r = gpu_check(tmp_path, "-h")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: scripts/gpu_check.sh")
    for word in STEPS + ["--out", "--skip-build", "--steps", "--only", "--budget", "--limit",
                         "--venv", "--python", "--wheels", "--gl-debs", "--dry-run"]:
        assert word in r.stdout
    assert not list(tmp_path.iterdir()), "-h must not create anything"


BAD_ARGUMENTS = {
    "unknown-option": (["--frobnicate"], "unknown option '--frobnicate'"),
    "positional": (["extra"], "unexpected argument 'extra'"),
    "out-without-value": (["--out"], "--out needs a value"),
    "out-followed-by-option": (["--out", "--dry-run"], "--out needs a value"),
    "equals-form": (["--out=x"], "write '--out x'"),
    "steps-not-a-number": (["--steps", "abc"], "--steps must be a whole number >= 2000"),
    "steps-too-few": (["--steps", "1999"], "--steps must be a whole number >= 2000"),
    "budget-zero": (["--budget", "0"], "--budget must be a whole number of seconds > 0"),
    "budget-with-unit": (["--budget", "9m"], "--budget must be a whole number of seconds > 0"),
    "only-unknown-step": (["--only", "pytest,nosuch"], "--only: unknown step 'nosuch'"),
    "only-empty-name": (["--only", "pytest,,bench_ops"], "has an empty step name"),
    "limit-without-seconds": (["--limit", "build"], "--limit wants STEP=SECONDS"),
    "limit-unknown-step": (["--limit", "nosuch=10"], "--limit: unknown step 'nosuch'"),
    "limit-zero": (["--limit", "pytest=0"], "a limit must be > 0 seconds"),
    "skip-build-only-build": (["--skip-build", "--only", "build"], "contradict"),
    "skip-build-no-venv": (["--skip-build", "--venv", "no_venv_here"], "--skip-build: there is no"),
    "wheels-missing": (["--wheels", "no_such_folder"], "--wheels: no folder"),
    "gl-debs-empty": (["--gl-debs", "."], "--gl-debs: no .deb files"),
}


@pytest.mark.parametrize("args,message", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_are_rejected_with_a_message(tmp_path, args, message):
    r = gpu_check(tmp_path, *args, "--out", "out")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr and "gpu_check.sh -h" in r.stderr
    assert not (tmp_path / "out").exists(), "a rejected command must not start"


# --- the sequence of steps --------------------------------------------------------------

def test_dry_run_prints_every_step_in_order_and_runs_nothing(tmp_path):
    venv = tmp_path / "venv"
    r = gpu_check(tmp_path, "--dry-run", "--out", "out", "--steps", "3000", "--venv", str(venv))
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert not venv.exists(), "a dry run must not create the venv"
    positions = [r.stdout.index(f"/7 {s} (limit ") for s in STEPS]
    assert positions == sorted(positions)
    for expected in ["-m venv", "torch==2.14.1", "TPX_FORCE_CUDA=1", "TORCH_CUDA_ARCH_LIST=",
                     "--no-build-isolation -e '.[dev,dreamer]'", "-m tpx_ext\n",
                     "-k 'cuda and not gpu_check'", "bench/ops.py --device cuda",
                     "bench/train_step.py --device cuda", "--configs dmc_proprio",
                     "--configs dmc_vision", "--estimator tpx", "--steps 3000",
                     "--precision bf16", "--precision 16"]:
        assert expected in r.stdout, expected
    rows = tsv_rows(tmp_path / "out")
    assert [row["step"] for row in rows] == STEPS
    assert {row["status"] for row in rows} == {"dry-run"}
    assert "--configs dmc_vision" in rows[-1]["command"]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "Dry run" in summary and "| dmc_vision | dry run |" in summary


def test_only_keeps_the_fixed_order_and_limit_overrides_a_default(tmp_path):
    r = gpu_check(tmp_path, "--dry-run", "--out", "out", "--only", "dmc_vision,pytest,pytest",
                  "--limit", "pytest=33")
    assert r.returncode == 0, r.stderr
    rows = tsv_rows(tmp_path / "out")
    assert [(row["step"], row["limit"]) for row in rows] == [("pytest", "33"), ("dmc_vision", "120")]


def test_steps_without_a_gpu_fail_cleanly_and_the_next_ones_still_run(tmp_path):
    r = gpu_check(tmp_path, "--skip-build", "--venv", sys.prefix, "--out", "out",
                  "--only", "selfcheck,bench_ops,dmc_proprio")
    assert r.returncode == 1, (r.stdout, r.stderr)
    out = tmp_path / "out"
    rows = tsv_rows(out)
    assert [(row["step"], row["status"], row["rc"]) for row in rows] == [
        ("selfcheck", "fail", "1"), ("bench_ops", "fail", "1"), ("dmc_proprio", "fail", "1")]
    for i, step in enumerate(["selfcheck", "bench_ops", "dmc_proprio"], 1):
        assert f"{i}/3 {step}: FAIL in" in r.stdout
    assert "CUDA is not available to torch" in r.stdout
    assert "FAILED: selfcheck bench_ops dmc_proprio" in r.stdout
    log = (out / "gpu_check.log").read_text()
    assert log.count("CUDA is not available to torch") >= 3
    assert "===== step dmc_proprio: end: fail rc=1" in log
    summary = (out / "summary.md").read_text()
    assert "**0 of 3 steps passed; not passed: selfcheck, bench_ops, dmc_proprio.**" in summary
    assert "### bench_ops: FAIL (exit 1)" in summary
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "steps.tsv", "summary.md"]


def test_steps_left_without_time_are_skipped_and_fail_the_run(tmp_path):
    r = gpu_check(tmp_path, "--skip-build", "--venv", sys.prefix, "--out", "out", "--budget", "30",
                  "--only", "selfcheck,pytest")
    assert r.returncode == 1, (r.stdout, r.stderr)
    rows = tsv_rows(tmp_path / "out")
    assert [(row["step"], row["status"]) for row in rows] == [("selfcheck", "skipped"), ("pytest", "skipped")]
    assert "1/2 selfcheck: SKIPPED" in r.stdout
    assert "| pytest | SKIPPED |" in (tmp_path / "out" / "summary.md").read_text()


# --- the summary writer -------------------------------------------------------------------

SELFCHECK = """\
+ .venv/bin/python -m tpx_ext
tpx_ext | devices: cpu, cuda
  compiled against torch 2.14.1 (running 2.14.1+cu130) by gcc 12.2.0
  CUDA kernels: compiled with CUDA 13.0 for sm_90; runtime 13.0, driver 13.0
  CPU kernels: avx2+fma, 16 threads
self-check: gaussian_tpx_backward (B=2500, D=60, float32) vs the float64 reference
  cpu   max|k - k_ref| = 4.4e-16  max rel. error of grad_mu = 5.9e-08  0.231 ms/call  OK
  cuda  max|k - k_ref| = 4.4e-16  max rel. error of grad_mu = 5.9e-08  0.021 ms/call  OK
all checks passed
"""
PYTEST = """\
gpu_check: cuda: torch 2.14.1+cu130 (CUDA 13.0): NVIDIA H200 (sm_90), 1 device(s)
........F.......
=========================== short test summary info ============================
FAILED python_tests/test_ops_numerics.py::test_cpu_and_cuda_agree[3-1000] - AssertionError
1 failed, 225 passed, 416 deselected in 41.20s
gpu_check: key: 1 failed, 225 passed, 416 deselected in 41.20s
"""
OPS = """\
Machine: Intel Xeon, 16 cores, torch 2.14.1+cu130 (16 threads), GPU: NVIDIA H200
Copy bandwidth (device cuda, 256 MiB, read + write): 4012.3 GB/s
Timed with CUDA events

| op | B | C | dtype | fused | eager |
| ivw_combine | 2500 | 12 | float32 | 0.010 ms | 0.080 ms |
(3 s)
"""
TRAIN_STEP = """\
Agent: presets ['dmc_proprio'], 50x50 = 2500 start states; 5 rounds, median, CUDA events

| H | what | rp | tpx |
| 15 | update | 50.0 ms | 52.0 ms |
Terminated
"""
PROPRIO = """\
tpx_ext.train | walker_walk (state) | estimator tpx | horizon 15 | 5000 env steps | device cuda | run dir x
final eval return: 35.2 +- 3.1 (2 episodes) after 5000 env steps, 250 updates (0 model / 0 actor updates skipped as non-finite); curves: python -m tpx_ext.plot x
"""


def fake_run(out, steps, sections, machine=None):
    out.mkdir()
    (out / "steps.tsv").write_text("step\tstatus\trc\tseconds\tlimit\tcommand\n" + "".join(
        "\t".join(row) + "\n" for row in steps))
    machine = machine or {"date": "2026-12-01 10:00 UTC", "args": "--out x", "commit": "abc1234",
                          "cores": "16", "gpu": "NVIDIA H200, 143771 MiB, 580.159.04, 9.0",
                          "nvcc": "release 13.0", "python": "Python 3.12.3", "budget": "570 s"}
    log = "===== machine =====\n" + "".join(f"{k}: {v}\n" for k, v in machine.items())
    for name, (text, status, rc, seconds) in sections.items():
        log += f"===== step {name}: begin (limit 90 s) =====\n{text}"
        if status is not None:
            log += f"===== step {name}: end: {status} rc={rc} {seconds} s =====\n"
    (out / "gpu_check.log").write_text(log)


def write_metrics(run_dir, records):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 50')


def test_summary_of_a_run_with_every_kind_of_result(tmp_path):
    gs = load_summary_module()
    out, runs = tmp_path / "out", tmp_path / "runs"
    fake_run(out, [
        ("build", "pass", "0", "150", "270", "pip install -e '.[dev,dreamer]'"),
        ("selfcheck", "pass", "0", "12", "45", ".venv/bin/python -m tpx_ext"),
        ("pytest", "fail", "1", "45", "120", "pytest -k 'cuda and not gpu_check' | x"),
        ("bench_ops", "pass", "0", "40", "90", "bench/ops.py --device cuda"),
        ("bench_train_step", "timeout", "124", "90", "90", "bench/train_step.py --device cuda"),
        ("dmc_proprio", "pass", "0", "60", "90", "python -m tpx_ext.train --configs dmc_proprio"),
        ("dmc_vision", "skipped", "-", "0", "0", "out of time budget"),
    ], {
        "build": ("gpu_check: WARNING: the dev and dmc extras could not be installed\n"
                  "tpx_ext built: torch 2.14.1+cu130 | CUDA kernels: sm_90\n", "pass", 0, 150),
        "selfcheck": (SELFCHECK, "pass", 0, 12),
        "pytest": (PYTEST, "fail", 1, 45),
        "bench_ops": (OPS, "pass", 0, 40),
        "bench_train_step": (TRAIN_STEP, "timeout", 124, 90),
        "dmc_proprio": (PROPRIO, "pass", 0, 60),
        "dmc_vision": ("not started: 10 s of the 570 s budget left\n", "skipped", "-", 0),
    })
    write_metrics(runs / "dmc_proprio", [
        {"step": 0, "eval_return": 20.5, "eval_return_std": 1.0, "eval_episodes": 2},
        {"step": 1000, "train_return": 10.0, "env_steps_per_second": 900.0, "episodes": 1, "updates": 0},
        {"step": 3000, "train_return": 30.0, "env_steps_per_second": 300.0, "update_seconds": 0.05,
         "updates": 150, "model_skipped": 0, "actor_skipped": 1},
        {"step": 5000, "train_return": 40.0, "env_steps_per_second": 400.0, "update_seconds": 0.07,
         "updates": 250, "model_skipped": 0, "actor_skipped": 1},
        {"step": 5000, "eval_return": 35.2, "eval_return_std": 3.1, "eval_episodes": 2},
    ])
    assert gs.main(["--out", str(out), "--runs", str(runs)]) == 0
    md = (out / "summary.md").read_text()
    assert md.startswith("# GPU check\n")
    assert "`scripts/gpu_check.sh --out x` on 2026-12-01 10:00 UTC, commit abc1234" in md
    assert "the steps took 397 s of the 570 s budget" in md
    assert "**4 of 7 steps passed; not passed: pytest, bench_train_step, dmc_vision.**" in md
    assert "| build | PASS | 150 s | 270 s | `pip install -e '.[dev,dreamer]'` |" in md
    assert "| pytest | FAIL (exit 1) | 45 s | 120 s | `pytest -k 'cuda and not gpu_check' \\| x` |" in md
    assert "| bench_train_step | TIMEOUT (exit 124) |" in md
    assert "| dmc_vision | SKIPPED | 0 s | 0 s |" in md
    assert "- gpu: NVIDIA H200, 143771 MiB, 580.159.04, 9.0" in md
    assert "- the dev and dmc extras could not be installed" in md  # warnings
    assert "tpx_ext built: torch 2.14.1+cu130 | CUDA kernels: sm_90" in md
    assert "CUDA kernels: compiled with CUDA 13.0 for sm_90; runtime 13.0, driver 13.0" in md
    assert "  cuda  max|k - k_ref|" in md and "all checks passed\n```" in md
    assert "`1 failed, 225 passed, 416 deselected in 41.20s`" in md
    assert "- `FAILED python_tests/test_ops_numerics.py::test_cpu_and_cuda_agree[3-1000] - AssertionError`" in md
    # bench tables get markdown's header rule; what a killed bench printed is kept
    assert ("Timed with CUDA events\n\n| op | B | C | dtype | fused | eager |\n|---|---|---|---|---|---|\n"
            "| ivw_combine | 2500 | 12 | float32 | 0.010 ms | 0.080 ms |") in md
    assert "| H | what | rp | tpx |\n|---|---|---|---|\n| 15 | update | 50.0 ms | 52.0 ms |" in md
    # training: the final line, and numbers from metrics.jsonl (its last, cut-off line ignored)
    assert "| dmc_proprio | PASS | 35.2 +- 3.1 | 20.5 | 5000 | 250 | 0 / 1 | 400 | 0.060 | 60 s |" in md
    assert "| dmc_vision | SKIPPED | - |" in md
    assert "- dmc_proprio: `final eval return: 35.2 +- 3.1 (2 episodes) after 5000 env steps" in md
    # the ends of the logs of the steps that did not pass, and only of those
    assert "### pytest: FAIL (exit 1)\n\n```\ngpu_check: cuda:" in md
    assert "### bench_train_step: TIMEOUT (exit 124)" in md and "Terminated\n```" in md
    assert "### dmc_vision: SKIPPED\n\n```\nnot started: 10 s of the 570 s budget left\n```" in md
    assert "### build" not in md and "### dmc_proprio" not in md
    assert "gpu_check: key:" not in md.split("## Ends of the logs")[1]


def test_summary_when_every_step_passed(tmp_path):
    gs = load_summary_module()
    out = tmp_path / "out"
    fake_run(out, [("selfcheck", "pass", "0", "12", "45", "x"), ("bench_ops", "pass", "0", "40", "90", "y")],
             {"selfcheck": (SELFCHECK, "pass", 0, 12), "bench_ops": (OPS, "pass", 0, 40)})
    gs.main(["--out", str(out)])
    md = (out / "summary.md").read_text()
    assert "**All 2 steps passed.**" in md
    assert "## Ends of the logs" not in md and "## Training runs" not in md and "## Warnings" not in md


def test_summary_of_a_check_stopped_in_the_middle_of_a_step(tmp_path):
    """A lending machine can stop the whole command: the step that was running has a begin
    line and no row; --to writes the summary elsewhere (the returned files are read-only)."""
    gs = load_summary_module()
    out = tmp_path / "out"
    fake_run(out, [("selfcheck", "pass", "0", "12", "45", "x")],
             {"selfcheck": (SELFCHECK, "pass", 0, 12),
              "pytest": ("gpu_check: cuda: ok\n.....\n", None, None, None)})
    target = tmp_path / "elsewhere.md"
    gs.main(["--out", str(out), "--to", str(target)])
    assert not (out / "summary.md").exists()
    md = target.read_text()
    assert "**1 of 2 steps passed; not passed: pytest.**" in md
    assert "| pytest | INTERRUPTED | ? s | 90 s |" in md
    assert "### pytest: INTERRUPTED\n\n```\ngpu_check: cuda: ok\n.....\n```" in md


def test_summary_writer_rejects_a_folder_without_steps(tmp_path, capsys):
    gs = load_summary_module()
    with pytest.raises(SystemExit) as exc:
        gs.main(["--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "no steps.tsv there" in capsys.readouterr().err


# --- the wheels for a machine without a package index ------------------------------------

def test_dm_control_wheel_is_rewritten_without_locomotion_and_with_a_matching_record(tmp_path):
    import zipfile

    spec = importlib.util.spec_from_file_location("gpu_wheels", ROOT / "scripts" / "gpu_wheels.py")
    gw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gw)
    wheel = tmp_path / "dm_control-1.0.50-py3-none-any.whl"
    files = {"dm_control/__init__.py": b"", "dm_control/suite/walker.py": b"x = 1\n",
             "dm_control/locomotion/arenas/big.xml": b"<mujoco/>" * 1000}
    record = "".join(f"{name},sha256=abc,{len(data)}\n" for name, data in files.items())
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("dm_control-1.0.50.dist-info/RECORD", record + "dm_control-1.0.50.dist-info/RECORD,,\n")
    assert gw.slim_wheel(str(wheel)) > 0
    with zipfile.ZipFile(wheel) as z:
        assert sorted(z.namelist()) == ["dm_control-1.0.50.dist-info/RECORD", "dm_control/__init__.py",
                                        "dm_control/suite/walker.py"]
        assert z.read("dm_control/suite/walker.py") == b"x = 1\n"
        assert z.read("dm_control-1.0.50.dist-info/RECORD").decode().splitlines() == [
            "dm_control/__init__.py,sha256=abc,0", "dm_control/suite/walker.py,sha256=abc,6",
            "dm_control-1.0.50.dist-info/RECORD,,"]
    assert any(r.startswith("dm_control==1.0.50") for r in gw.requirements())
    assert any(r.startswith("mujoco==3.17.0") for r in gw.requirements())
