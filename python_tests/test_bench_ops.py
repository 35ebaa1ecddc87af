"""bench/ops.py runs: every op's row at a tiny size, the optional float64 eager variant, and
a refused unknown variant (the timings themselves are the benchmark's, not checked here)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import ops  # noqa: E402


def test_the_table_has_a_row_per_op_and_the_variants_asked_for(capsys):
    ops.main(["--sizes", "16x4", "--dtypes", "float32", "--budget", "0.02",
              "--variants", "eager,eager-f64"])
    out = capsys.readouterr().out
    head = next(line for line in out.splitlines() if line.startswith("| op |"))
    assert head == ("| op | B | C | dtype | fused | eager | compiled | reference f64 | eager-f64 | "
                    "eager / fused | compiled / fused | eager-f64 / fused | fused GB/s | "
                    "fused / copy floor |")
    rows = [line for line in out.splitlines() if line.startswith("| ") and "| 16 | " in line]
    assert [r.split(" | ")[0][2:] for r in rows] == list(ops.OPS)
    for r in rows:
        cells = r.strip("| ").split(" | ")
        assert len(cells) == head.count("|") - 1
        # timed: fused, eager, eager-f64 and their ratios; not asked for: compiled, reference
        assert [c == "-" for c in cells[4:12]] == [False, False, True, True, False, False, True, False]


def test_an_unknown_variant_is_refused(capsys):
    with pytest.raises(SystemExit):
        ops.main(["--variants", "eager,fast"])
    assert "--variants: unknown fast; known: fused, eager, compiled, reference f64, eager-f64" in \
        capsys.readouterr().err


def test_the_eager_compositions_compute_the_ops_math():
    """eager_comoments is the co-moments op's covariance (ucb = 0), which the op's own tests
    check against the float64 reference."""
    import torch
    from tpx_ext import reference
    gen = torch.Generator().manual_seed(0)
    d, eps = (torch.randn(64, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    sigma = torch.rand(64, 3, generator=gen, dtype=torch.float64) + 0.1
    adv = torch.randn(64, generator=gen, dtype=torch.float64)
    cov, bound, finite = ops.eager_comoments(d, eps, sigma, adv)
    ref = reference.gaussian_comoments(d, eps, sigma, adv, ucb=0.0)
    torch.testing.assert_close(cov, ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bound, ref[1], rtol=1e-12, atol=1e-12)
    assert bool(finite.all())
