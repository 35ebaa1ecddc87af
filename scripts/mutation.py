"""Mutation testing of the estimator library and the Dreamer (`make mutation`), and its report.

    python scripts/mutation.py                 # run (or resume) mutmut, then write the report
    python scripts/mutation.py --report-only   # only rewrite docs/MUTATION.md from mutants/
    python scripts/mutation.py --files tpx_ext/estimators/modes.py   # a part of the scope

mutmut (configured in pyproject.toml's [tool.mutmut]) writes every mutant of the scoped
files into mutants/ and runs, for each, only the tests that execute the mutated function.
Its results are kept in mutants/**/*.meta, so an interrupted run resumes where it stopped.
The report counts killed, survived, timed-out and untested mutants per file. A survivor is
either explained in scripts/mutation_equivalent.json (mutant name -> why no test can tell
it from the original) or listed as unexplained with its diff; the score per file is killed /
(checked - equivalent).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "docs" / "MUTATION.md"
EQUIVALENT = ROOT / "scripts" / "mutation_equivalent.json"
KILLED, SURVIVED = {1, 3}, {0}
TIMEOUT = {36, -24, 24, 152, 255}
STATUS = {None: "not checked", 5: "no tests", 33: "no tests", 34: "skipped", 37: "type check",
          -11: "crashed", -9: "crashed"}


def status(code) -> str:
    if code in KILLED:
        return "killed"
    if code in SURVIVED:
        return "survived"
    if code in TIMEOUT:
        return "timeout"
    return STATUS.get(code, "suspicious")


def results() -> dict:
    """{source file: {mutant name: status}} from mutmut's .meta files."""
    out = defaultdict(dict)
    for meta in sorted((ROOT / "mutants").rglob("*.py.meta")):
        source = str(meta.relative_to(ROOT / "mutants"))[: -len(".meta")]
        with open(meta) as f:
            data = json.load(f)
        for name, code in data["exit_code_by_key"].items():
            out[source][name] = status(code)
    return out


def diff(name: str) -> str:
    out = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=ROOT,
                         capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("+", "-"))
             and not ln.startswith(("+++", "---"))]
    return "\n".join(lines) or out.stdout.strip()


def write_report(run_seconds, command: str) -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        tool = f"mutmut {version('mutmut')}"
    except PackageNotFoundError:
        tool = "mutmut not installed here"
    equivalent = json.loads(EQUIVALENT.read_text()) if EQUIVALENT.exists() else {}
    by_file = results()
    rows, unexplained, explained = [], [], []
    totals = Counter()
    for source, mutants in sorted(by_file.items()):
        c = Counter(mutants.values())
        eq = sum(1 for n, s in mutants.items() if s == "survived" and n in equivalent)
        checked = len(mutants) - c["not checked"]
        denom = checked - eq - c["no tests"]
        score = f"{100 * c['killed'] / denom:.0f}%" if denom else "-"
        rows.append(f"| `{source}` | {len(mutants)} | {c['killed']} | {c['survived'] - eq} | {eq} | "
                    f"{c['timeout']} | {c['no tests']} | {c['not checked']} | {score} |")
        totals.update(c)
        totals["equivalent"] += eq
        for n, s in sorted(mutants.items()):
            if s == "survived":
                (explained if n in equivalent else unexplained).append(n)
    lines = [
        "# Mutation testing",
        "",
        f"Command: `{command}` ({tool}"
        + (f", {run_seconds / 60:.0f} min on this run" if run_seconds else "") + ").",
        "Scope and test selection: `[tool.mutmut]` in pyproject.toml. score = killed / "
        "(checked - equivalent - no tests); a timeout counts as not killed.",
        "",
        "| file | mutants | killed | survived | equivalent | timeout | no tests | not checked | score |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Totals: {sum(totals[k] for k in totals if k != 'equivalent')} mutants, "
        f"{totals['killed']} killed, {totals['survived'] - totals['equivalent']} survived, "
        f"{totals['equivalent']} equivalent, {totals['timeout']} timed out, "
        f"{totals['not checked']} not checked.",
        "",
        "## Equivalent survivors",
        "",
    ]
    for n in explained:
        lines += [f"- `{n}`: {equivalent[n]}"]
    lines += ["", "## Unexplained survivors", ""]
    for n in unexplained:
        lines += [f"- `{n}`", "", "```diff", diff(n), "```", ""]
    REPORT.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {REPORT}: {totals['killed']} killed, "
          f"{totals['survived'] - totals['equivalent']} unexplained survivors")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--max-children", type=int, default=os.cpu_count() or 1)
    p.add_argument("--files", nargs="*", default=[],
                   help="only the mutants of these source files (default: the whole scope)")
    a = p.parse_args(argv)
    seconds = None
    if not a.report_only:
        names = [f"{f.removesuffix('.py').replace('/', '.')}*" for f in a.files]
        t0 = time.perf_counter()
        # mutmut reads its configuration from the working directory's pyproject.toml
        proc = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children",
                               str(a.max_children), *names], cwd=ROOT)
        seconds = time.perf_counter() - t0
        if proc.returncode not in (0, 1):
            sys.exit(f"mutmut run failed (exit {proc.returncode})")
    write_report(seconds, "make mutation")


if __name__ == "__main__":
    main()
