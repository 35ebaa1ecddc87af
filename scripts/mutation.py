"""Mutation testing of the estimator library and the Dreamer (`make mutation`), and its report.

    python scripts/mutation.py                 # run (or resume) mutmut, then write the report
    python scripts/mutation.py --report-only   # only rewrite docs/MUTATION.md from mutants/
    python scripts/mutation.py --files tpx_ext/estimators/modes.py   # a part of the scope
    python scripts/mutation.py --recheck-survivors   # after adding tests: survivors again
    python scripts/mutation.py --recheck NAME...     # these mutants again, whatever their verdict
    python scripts/mutation.py --explain NAME "why"  # record a survivor as equivalent

mutmut (configured in pyproject.toml's [tool.mutmut]) writes every mutant of the scoped
files into mutants/ and runs, for each, only the tests that execute the mutated function;
python_tests/conftest.py orders them fastest first and leaves out those slower than
MUTATION_TEST_LIMIT_S (except for the trainer's mutants, which only whole runs reach), and
fails a test that runs ten times its recorded duration in CPU time (at least a minute): a
mutant that loops forever is killed, as PIT and Stryker count timeouts as detected.
Its results are kept in mutants/**/*.meta, so an interrupted run resumes where it stopped.
A changed test selection or pytest arguments in [tool.mutmut] makes mutmut discard every
verdict (a full rerun); a changed test file does not, so after adding tests use
--recheck-survivors.
The report counts killed, survived, timed-out and untested mutants per file. A survivor is
explained in scripts/mutation_equivalent.json (mutant name -> {"reason": why no test can
tell it from the original, "mutation": the mutant's own lines}), or only rewords an error
message (reported apart), or is listed as unexplained with its diff. An edit of a function
renumbers its mutants, so an entry explains its survivor only while the survivor's lines
are still the recorded ones; otherwise the survivor is unexplained and the entry is
reported as stale, as is an entry whose mutant no longer survives.
score = killed / (checked - equivalent - no tests); the behaviour score also leaves out the
rewording survivors.
"""

import argparse
import ast
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
KILLED, SURVIVED, NO_TESTS = {1, 3}, {0}, {5, 33}
TIMEOUT = {36, -24, 24, 152, 255}
STATUS = {None: "not checked", **dict.fromkeys(NO_TESTS, "no tests"), 34: "skipped", 37: "type check",
          -11: "crashed", -9: "crashed"}


def conftest_limits(path=ROOT / "python_tests" / "conftest.py") -> dict:
    """The mutation-testing limits python_tests/conftest.py defines (the MUTATION_* names),
    read from its source so that the report states the values the run used."""
    limits = {}
    for node in ast.parse(Path(path).read_text()).body:
        if not isinstance(node, ast.Assign):
            continue
        target = node.targets[0]
        names = target.elts if isinstance(target, ast.Tuple) else [target]
        values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
        for name, value in zip(names, values):
            if isinstance(name, ast.Name) and name.id.startswith("MUTATION_"):
                limits[name.id] = ast.literal_eval(value)
    return limits


def status(code) -> str:
    if code in KILLED:
        return "killed"
    if code in SURVIVED:
        return "survived"
    if code in TIMEOUT:
        return "timeout"
    return STATUS.get(code, "suspicious")


def retrying(read):
    """read() (which parses .meta files), tried for up to 10 s: a running mutmut rewrites
    them in place, so a read can meet a half-written file."""
    for attempt in range(20):
        try:
            return read()
        except json.JSONDecodeError:
            if attempt == 19:
                raise
            time.sleep(0.5)


def metas():
    """(path, source file, parsed content) of each of mutmut's .meta files, in order."""
    for meta in sorted((ROOT / "mutants").rglob("*.py.meta")):
        source = str(meta.relative_to(ROOT / "mutants"))[: -len(".meta")]
        yield meta, source, retrying(lambda: json.loads(meta.read_text()))


def results() -> dict:
    """{source file: {mutant name: status}} from mutmut's .meta files."""
    out = defaultdict(dict)
    for _, source, data in metas():
        for name, code in data["exit_code_by_key"].items():
            out[source][name] = status(code)
    return out


def mutant_seconds() -> tuple:
    """(seconds, mutants): the sum of the durations mutmut recorded for the mutants that
    have a verdict, over every run that gave them one."""
    total, count = 0.0, 0
    for _, _, data in metas():
        durations = data.get("durations_by_key", {})
        for name, code in data["exit_code_by_key"].items():
            if code is not None and name in durations:
                total, count = total + durations[name], count + 1
    return total, count


def reset_survivors(prefixes, names=()) -> int:
    """Mark as not checked the survivors and the mutants that had no tests (those whose
    names start with one of `prefixes`; all for [], none for None) and the mutants named in
    `names` whatever their verdict, so the next run tries them again: mutmut reruns a mutant
    only when its function changed, not when a test was added that may reach or kill it."""
    count, names = 0, set(names)
    for meta, _, data in metas():
        codes = data["exit_code_by_key"]
        reset = [name for name, code in codes.items() if name in names or (
            prefixes is not None and code in SURVIVED | NO_TESTS
            and (not prefixes or name.startswith(tuple(prefixes))))]
        if reset:  # mutmut's own files are left untouched where nothing changes
            codes.update(dict.fromkeys(reset))
            meta.write_text(json.dumps(data, indent=4))
            count += len(reset)
    return count


def full_diff(name: str) -> str:
    """mutmut's unified diff of one mutant against the original (with context lines);
    called in this process, as `mutmut show` would reload the tool per mutant."""
    from mutmut.__main__ import get_diff_for_mutant

    cwd = os.getcwd()
    os.chdir(ROOT)  # mutmut reads mutants/ relative to the working directory
    try:
        return retrying(lambda: get_diff_for_mutant(name))
    finally:
        os.chdir(cwd)


def mutation_of(diff_text: str) -> str:
    """The mutant's own lines (the + side of its diff, stripped of indentation): what an
    equivalence entry records next to its reason."""
    return "\n".join(ln[1:].strip() for ln in diff_text.splitlines()
                     if ln.startswith("+") and not ln.startswith("+++"))


def load_equivalent() -> dict:
    """{mutant name: {"reason", "mutation"}} from EQUIVALENT ({} if there is none)."""
    if not EQUIVALENT.exists():
        return {}
    entries = json.loads(EQUIVALENT.read_text())
    bad = [n for n, e in entries.items()
           if not (isinstance(e, dict) and set(e) == {"reason", "mutation"})]
    if bad:
        sys.exit(f"{EQUIVALENT}: each entry must be {{\"reason\": ..., \"mutation\": ...}} "
                 f"(record one with --explain NAME REASON); not so: {', '.join(bad[:5])}")
    return entries


def explain(name: str, reason: str) -> None:
    """Record survivor `name` as equivalent, with its current lines."""
    status = results()
    found = [s for d in status.values() for n, s in d.items() if n == name]
    if found != ["survived"]:
        sys.exit(f"--explain: {name} is {found[0] if found else 'not a mutant of the scope'}, "
                 "not a survivor")
    entries = load_equivalent()
    entries[name] = {"reason": reason, "mutation": mutation_of(full_diff(name))}
    EQUIVALENT.write_text(json.dumps(entries, indent=4, ensure_ascii=False) + "\n")


def changed_lines(diff_text: str) -> str:
    lines = [ln for ln in diff_text.splitlines() if ln.startswith(("+", "-"))
             and not ln.startswith(("+++", "---"))]
    return "\n".join(lines) or diff_text.strip()


MESSAGE_OPENERS = ("raise ", "warnings.warn(", "print(", "sys.exit(", "parser.error(")


def message_wording_only(diff_text: str) -> bool:
    """True when a mutant only wraps text of an error or warning message in XX or changes
    its case: what the program does is unchanged, only the message's wording. The changed
    line must belong to a raise/warn/print statement (it or one of the 4 context lines
    before it opens one) and must not compare strings (`==`, `!=`), so a mutated key or
    mode name never counts."""
    lines = diff_text.splitlines()
    removed = [i for i, ln in enumerate(lines) if ln.startswith("-") and not ln.startswith("---")]
    added = [i for i, ln in enumerate(lines) if ln.startswith("+") and not ln.startswith("+++")]
    if not removed or len(removed) != len(added):
        return False
    for i, j in zip(removed, added):
        old, new = lines[i][1:], lines[j][1:]
        if old == new or "==" in old or "!=" in old:
            return False
        if new.replace("XX", "").lower() != old.lower():
            return False
        opened = any(lines[k][1:].lstrip().startswith(MESSAGE_OPENERS)
                     or "Error(" in lines[k] or "Warning(" in lines[k]
                     for k in range(max(0, i - 4), i + 1) if not lines[k].startswith("+"))
        if not opened:
            return False
    return True


def write_report(run_seconds, command: str) -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        tool = f"mutmut {version('mutmut')}"
    except PackageNotFoundError:
        tool = "mutmut not installed here"
    equivalent = load_equivalent()
    by_file = results()
    rows, unexplained, explained, wording, stale = [], [], [], [], []
    diffs = {}
    totals = Counter()
    for source, mutants in sorted(by_file.items()):
        c = Counter(mutants.values())
        eq = msg = 0
        for n, s in sorted(mutants.items()):
            if s != "survived":
                continue
            diffs[n] = full_diff(n)
            if n in equivalent:
                if mutation_of(diffs[n]) == equivalent[n]["mutation"]:
                    explained.append(n)
                    eq += 1
                    continue
                stale.append(n)  # its function was edited: the entry is for another mutant
            if message_wording_only(diffs[n]):
                wording.append(n)
                msg += 1
            else:
                unexplained.append(n)
        checked = len(mutants) - c["not checked"]
        denom = checked - eq - c["no tests"]
        score = f"{100 * c['killed'] / denom:.0f}%" if denom else "-"
        behaviour = f"{100 * c['killed'] / (denom - msg):.0f}%" if denom - msg else "-"
        rows.append(f"| `{source}` | {len(mutants)} | {c['killed']} | {c['survived'] - eq - msg} | "
                    f"{msg} | {eq} | {c['timeout']} | {c['no tests']} | {c['not checked']} | "
                    f"{score} | {behaviour} |")
        totals.update(c)
        totals["equivalent"] += eq
        totals["wording"] += msg
    status = {n: s for d in by_file.values() for n, s in d.items()}
    stale += [n for n in equivalent if status.get(n, "gone") not in ("survived", "not checked")]
    limits = conftest_limits()
    seconds, timed = mutant_seconds()
    lines = [
        "# Mutation testing",
        "",
        f"Command: `{command}` ({tool}"
        + (f", {run_seconds / 60:.0f} min on this run" if run_seconds else "") + ").",
        "Scope and test selection: `[tool.mutmut]` in pyproject.toml; each mutant runs the "
        "selected tests that execute its function, fastest first, without those slower than "
        f"{limits['MUTATION_TEST_LIMIT_S']:g} s except for train.py's mutants, and a test that "
        f"runs {limits['MUTATION_TIMEOUT_FACTOR']:g} times its recorded duration in CPU time (at "
        f"least {limits['MUTATION_TIMEOUT_FLOOR_S']:g} s) fails, so an endless loop is killed "
        "(python_tests/conftest.py). score = killed / "
        "(checked - equivalent - no tests); a timeout counts as not killed. `wording` counts "
        "survivors that only wrap an error message's text in XX or change its case (listed "
        "below); they count as not killed in `score` and are left out of `behaviour score`.",
        "",
        "| file | mutants | killed | survived | wording | equivalent | timeout | no tests | "
        "not checked | score | behaviour score |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Totals: {sum(totals[k] for k in totals if k not in ('equivalent', 'wording'))} mutants, "
        f"{totals['killed']} killed, "
        f"{totals['survived'] - totals['equivalent'] - totals['wording']} survived, "
        f"{totals['wording']} message wording, {totals['equivalent']} equivalent, "
        f"{totals['timeout']} timed out, {totals['not checked']} not checked.",
        "",
        f"Mutant time: {seconds / 3600:.1f} h, the sum of the durations mutmut recorded for the "
        f"{timed} mutants with a verdict (each one's pytest run; two at a time on a 2-core "
        "machine), over all the runs that gave them; each run (or resume) also starts with "
        "mutmut's clean-test and coverage passes.",
        *([] if not totals["not checked"] else [
            "",
            f"**Partial report**: {totals['not checked']} mutants are not checked yet, so each "
            "score is over the mutants checked so far; a survivor checked before the tests "
            "that were added since is listed until `make mutation ARGS=--recheck-survivors` "
            "runs it again."]),
        "",
        "## Explained survivors",
        "",
        "Equivalent to the original, or (stated) indistinguishable on a machine without a GPU.",
        "",
    ]
    for n in explained:
        lines += [f"- `{n}`: {equivalent[n]['reason']}"]
    lines += ["", "## Message wording survivors", "",
              "The tests match each message's key phrase, not its every letter.", ""]
    lines += [f"- `{n}`: `{changed_lines(diffs[n]).splitlines()[-1][1:].strip()}`" for n in wording]
    lines += ["", "## Unexplained survivors", ""]
    for n in unexplained:
        lines += [f"- `{n}`", "", "```diff", changed_lines(diffs[n]), "```", ""]
    if stale:
        lines += ["", "## Stale equivalence entries", "",
                  "Entries of scripts/mutation_equivalent.json whose mutant no longer survives "
                  "or no longer makes the recorded change (its function was edited since): "
                  "remove them, or record the survivor again with --explain.", ""]
        lines += [f"- `{n}` ({status.get(n, 'gone')}; recorded: "
                  f"`{equivalent[n]['mutation']}`)" for n in stale]
    REPORT.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {REPORT}: {totals['killed']} killed, "
          f"{len(unexplained)} unexplained survivors, {len(wording)} message wording"
          + (f", {len(stale)} stale equivalence entries" if stale else ""))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--max-children", type=int, default=os.cpu_count() or 1)
    p.add_argument("--recheck-survivors", action="store_true",
                   help="run the survivors and the mutants that had no tests again (after adding "
                        "tests), not only unchecked mutants")
    p.add_argument("--recheck", nargs="+", default=[], metavar="MUTANT",
                   help="run these mutants again whatever their verdict (as mutmut names them)")
    p.add_argument("--explain", nargs=2, metavar=("MUTANT", "REASON"),
                   help="record a survivor as equivalent (with its current lines) and rewrite "
                        "the report")
    p.add_argument("--files", nargs="*", default=[],
                   help="only the mutants of these source files (default: the whole scope)")
    a = p.parse_args(argv)
    seconds = None
    if a.explain:
        explain(*a.explain)
    elif not a.report_only:
        names = [f"{f.removesuffix('.py').replace('/', '.')}*" for f in a.files]
        if a.recheck_survivors or a.recheck:
            prefixes = [n[:-1] for n in names] if a.recheck_survivors else None
            print(f"{reset_survivors(prefixes, a.recheck)} mutants to check again")
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
