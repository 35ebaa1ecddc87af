"""Writes summary.md for a run of scripts/gpu_check.sh, which calls it at the end.

    python scripts/gpu_summary.py --out DIR [--runs DIR] [--to FILE]

Reads DIR/steps.tsv (one row per step: step, status, rc, seconds, limit, command) and
DIR/gpu_check.log (a `machine` section of `key: value` lines, then each step's output
between `===== step NAME: begin ... =====` and `===== step NAME: end: ... =====`), and the
training runs' metrics.jsonl under --runs, and writes DIR/summary.md (or --to FILE: for
the files of a run that was stopped before its summary, in a read-only folder). A step whose
begin line has no end line was running when the check was stopped. Standard library only: it
must run even when the build step failed and the venv has nothing in it.
"""

import argparse
import csv
import json
import os
import re
import statistics
import sys

STATUS_TEXT = {"pass": "PASS", "fail": "FAIL", "timeout": "TIMEOUT", "skipped": "SKIPPED",
               "dry-run": "dry run", "interrupted": "INTERRUPTED"}
NOT_PASSED = ("fail", "timeout", "skipped", "interrupted")
TRAIN_STEPS = ("dmc_proprio", "dmc_vision")
BENCH_STEPS = {"bench_ops": "bench/ops.py", "bench_train_step": "bench/train_step.py"}
SECTION = re.compile(r"^===== step (\S+): begin.*?=====\n(.*?)^===== step \1: end: .*?=====$",
                     re.M | re.S)
BEGIN = re.compile(r"^===== step (\S+): begin \(limit (\d+) s\) =====$", re.M)
PYTEST_CLOSING = re.compile(r"^=*\s*(\d+ (?:passed|failed|errors?|skipped|deselected)\b.*?)\s*=*$", re.M)
RULE = re.compile(r"^\|[-:| ]+\|$")
FINAL_EVAL = re.compile(r"^final eval return: (.*)$", re.M)
TAIL_LINES = 25


def read_steps(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def split_log(text):
    """(machine facts as a dict, {step: its output}); a step that began and never ended
    gets what it wrote until the log stops."""
    machine = {}
    head = text.split("===== step ", 1)[0]
    for line in head.splitlines():
        if ": " in line and not line.startswith("====="):
            key, value = line.split(": ", 1)
            machine[key.strip()] = value.strip()
    sections = {m.group(1): m.group(2) for m in SECTION.finditer(text)}
    for m in BEGIN.finditer(text):
        if m.group(1) not in sections:
            sections[m.group(1)] = text[m.end():].lstrip("\n")
    return machine, sections


def interrupted_steps(text, steps):
    """Rows for the steps that began in the log but have no row in steps.tsv."""
    recorded = {s["step"] for s in steps}
    return [{"step": m.group(1), "status": "interrupted", "rc": "-", "seconds": "?",
             "limit": m.group(2), "command": ""}
            for m in BEGIN.finditer(text) if m.group(1) not in recorded]


def tail(text, n=TAIL_LINES):
    return "\n".join(text.rstrip("\n").splitlines()[-n:])


def pytest_result(text):
    """The closing line (`226 passed, 2 skipped in 40.1s`) and the FAILED/ERROR lines."""
    closing = PYTEST_CLOSING.findall(text)
    failed = [line for line in text.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return (closing[-1] if closing else None), failed


def bench_text(text):
    """The machine lines and the table a bench script printed (as far as it got)."""
    keep = [line for line in text.splitlines()
            if line.startswith(("Machine:", "Copy bandwidth", "Timed with", "Agent:", "|"))]
    out = []
    for i, line in enumerate(keep):
        header = line.startswith("|") and not (i and keep[i - 1].startswith("|"))
        out += [""] if header else []
        out.append(line)
        # The scripts print the header row without the rule that markdown needs under it.
        if header and not (i + 1 < len(keep) and RULE.match(keep[i + 1])):
            out.append("|" + "|".join("---" for _ in line.strip().strip("|").split("|")) + "|")
    return "\n".join(out)


def run_facts(run_dir):
    """Numbers of one training run from its metrics.jsonl (None if there is none)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut off by a killed run
                pass
    train = [r for r in records if "train_return" in r]
    evals = [r for r in records if "eval_return" in r]
    last = train[-1] if train else {}
    speeds = [r["env_steps_per_second"] for r in train if "env_steps_per_second" in r]
    updates = [r["update_seconds"] for r in train if "update_seconds" in r]
    return {
        "env_steps": max((r.get("step", 0) for r in records), default=0),
        "updates": last.get("updates"),
        "skipped": f"{last.get('model_skipped', '-')} / {last.get('actor_skipped', '-')}",
        "eval": (f"{evals[-1]['eval_return']:.1f} +- {evals[-1].get('eval_return_std', 0):.1f}"
                 if evals else None),
        "first_eval": f"{evals[0]['eval_return']:.1f}" if evals else None,
        "steps_per_s": statistics.median(speeds) if speeds else None,
        "update_s": statistics.mean(updates) if updates else None,
    }


def fmt(value, spec=""):
    return "-" if value is None else format(value, spec)


def render(steps, machine, sections, runs_dir=None):
    dry = bool(steps) and all(s["status"] == "dry-run" for s in steps)
    failed = [s["step"] for s in steps if s["status"] in NOT_PASSED]
    total = sum(int(s["seconds"]) for s in steps if s["seconds"].isdigit())
    lines = ["# GPU check", ""]
    args = machine.get("args", "(none)")
    command = "scripts/gpu_check.sh" + ("" if args == "(none)" else f" {args}")
    lines.append(f"`{command}` on {machine.get('date', 'an unknown date')}, commit "
                 f"{machine.get('commit', 'unknown')}; the steps took {total} s of the "
                 f"{machine.get('budget', '?')} budget.")
    lines.append("")
    if dry:
        lines.append("**Dry run: the commands were printed, nothing was run.**")
    elif not steps:
        lines.append("**No step ran.**")
    elif failed:
        lines.append(f"**{len(steps) - len(failed)} of {len(steps)} steps passed; "
                     f"not passed: {', '.join(failed)}.**")
    else:
        lines.append(f"**All {len(steps)} steps passed.**")
    lines += ["", "| step | result | time | limit | command |", "|---|---|---:|---:|---|"]
    for s in steps:
        result = STATUS_TEXT.get(s["status"], s["status"])
        if s["status"] in ("fail", "timeout"):
            result += f" (exit {s['rc']})"
        command = s["command"].replace("|", "\\|")
        lines.append(f"| {s['step']} | {result} | {s['seconds']} s | {s['limit']} s | "
                     f"`{command}` |" if command else
                     f"| {s['step']} | {result} | {s['seconds']} s | {s['limit']} s | |")

    lines += ["", "## Machine", ""]
    for key in ("gpu", "cores", "nvcc", "python"):
        if key in machine:
            lines.append(f"- {key}: {machine[key]}")

    warnings = [line for text in sections.values() for line in text.splitlines()
                if line.startswith("gpu_check: WARNING")]
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {w.split(': ', 2)[2]}" for w in warnings]

    ran = {s["step"]: s for s in steps}
    if "build" in sections:
        built = [line for line in sections["build"].splitlines() if line.startswith("tpx_ext built:")]
        if built:
            lines += ["", "## Build", "", built[-1]]
    if "selfcheck" in sections:
        text = sections["selfcheck"]
        start = text.find("tpx_ext | devices")
        if start >= 0:
            lines += ["", "## Build facts and self-check (`python -m tpx_ext`)", "", "```",
                      text[start:].rstrip("\n"), "```"]
    if "pytest" in sections:
        closing, failures = pytest_result(sections["pytest"])
        lines += ["", "## CUDA tests (`pytest -k cuda`)", "",
                  f"`{closing}`" if closing else "No pytest closing line (see the log)."]
        lines += [f"- `{f}`" for f in failures]
    for step, name in BENCH_STEPS.items():
        if step in sections:
            body = bench_text(sections[step])
            lines += ["", f"## `{name} --device cuda`", "", body if body.strip() else "No table (see the log)."]

    train = [s for s in TRAIN_STEPS if s in ran and ran[s]["status"] != "dry-run"]
    if train:
        lines += ["", "## Training runs (walker_walk, `--estimator tpx`)", "",
                  "| run | result | final eval return | first eval | env steps | updates "
                  "| skipped (model / actor) | env steps/s (median) | s/update (mean) | wall |",
                  "|---|---|---|---:|---:|---:|---|---:|---:|---:|"]
        for s in train:
            facts = run_facts(os.path.join(runs_dir, s)) if runs_dir else None
            final = FINAL_EVAL.findall(sections.get(s, ""))
            eval_text = final[-1].split(" (")[0] if final else (facts or {}).get("eval")
            facts = facts or {}
            lines.append(
                f"| {s} | {STATUS_TEXT.get(ran[s]['status'], ran[s]['status'])} | {fmt(eval_text)} "
                f"| {fmt(facts.get('first_eval'))} | {fmt(facts.get('env_steps'))} "
                f"| {fmt(facts.get('updates'))} | {facts.get('skipped', '-')} "
                f"| {fmt(facts.get('steps_per_s'), '.0f')} | {fmt(facts.get('update_s'), '.3f')} "
                f"| {ran[s]['seconds']} s |")
        finals = [f"- {s}: `final eval return: {FINAL_EVAL.findall(sections[s])[-1]}`"
                  for s in train if s in sections and FINAL_EVAL.findall(sections[s])]
        if finals:
            lines += [""] + finals

    bad = [s for s in steps if s["status"] in NOT_PASSED]
    if bad:
        lines += ["", "## Ends of the logs of the steps that did not pass", ""]
        for s in bad:
            text = "\n".join(line for line in sections.get(s["step"], "").splitlines()
                             if not line.startswith("gpu_check: key:"))
            lines += [f"### {s['step']}: {STATUS_TEXT.get(s['status'], s['status'])}"
                      + (f" (exit {s['rc']})" if s["rc"] not in ("-", "") else ""), "",
                      "```", tail(text) or "(no output)", "```", ""]
    lines += ["" if lines[-1] else None, "Full output: `gpu_check.log`; training metrics, configs and evaluation GIFs: "
              "`runs.tar.gz` (when a training run started)."]
    return "\n".join(line for line in lines if line is not None).rstrip("\n") + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the folder of steps.tsv and gpu_check.log")
    p.add_argument("--runs", default=None, help="the folder of the training runs")
    p.add_argument("--to", default=None, help="where to write the summary (default DIR/summary.md)")
    a = p.parse_args(argv)
    tsv = os.path.join(a.out, "steps.tsv")
    if not os.path.exists(tsv):
        p.error(f"--out {a.out}: no steps.tsv there (not the output folder of scripts/gpu_check.sh)")
    steps = read_steps(tsv)
    log_path = os.path.join(a.out, "gpu_check.log")
    text = open(log_path, encoding="utf-8", errors="replace").read() if os.path.exists(log_path) else ""
    machine, sections = split_log(text)
    steps += interrupted_steps(text, steps)
    path = a.to or os.path.join(a.out, "summary.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(render(steps, machine, sections, a.runs))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
