"""bench/peer_proppo.py without proppo: it says proppo is missing and measures tpx_ext alone."""

import csv
import importlib.util
import json
import math
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_bench():
    path = os.path.join(ROOT, "bench", "peer_proppo.py")  # bench/ is not a package
    spec = importlib.util.spec_from_file_location("peer_proppo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runs_without_proppo(tmp_path, capsys):
    bench = load_bench()
    threads = torch.get_num_threads()
    try:
        rows = bench.main(["--horizons", "3", "--batch", "16", "--reps", "3", "--no-progress",
                           "--out", str(tmp_path / "peer")])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "proppo not found" in out and "git clone https://github.com/proppo/proppo" in out
    assert "| H | rp | lr | tpx |" in out

    with open(tmp_path / "peer.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["method", "source", "horizon", "batch", "reps", "mean",
                                     "variance", "var_ci_low", "var_ci_high", "it_per_s"]
        table = list(reader)
    assert [(r["method"], r["source"], r["horizon"]) for r in table] == [
        ("rp", "tpx_ext", "3"), ("lr", "tpx_ext", "3"), ("tpx", "tpx_ext", "3")]
    for r in table:
        var, lo, hi = float(r["variance"]), float(r["var_ci_low"]), float(r["var_ci_high"])
        assert math.isfinite(var) and var > 0, r
        assert 0 < lo < var < hi < math.inf, r
        assert math.isfinite(float(r["mean"])) and float(r["it_per_s"]) > 0, r
    assert len(rows) == 3
    config = json.loads((tmp_path / "peer.json").read_text())["config"]
    assert config["proppo_found"] is False and config["reps"] == 3


def test_ratio_interval():
    bench = load_bench()
    r, lo, hi = bench.ratio_ci(2.0, 60, 1.0, 60)
    assert r == 2.0 and lo < r < hi
    assert math.isclose(math.log(r / lo), math.log(hi / r), rel_tol=1e-9)  # equal sizes: symmetric
    assert all(math.isnan(x) for x in bench.ratio_ci(1.0, 10, math.inf, 10))
