"""The documentation is runnable anywhere: it names no directory of the machine it was
written on (commands use relative paths such as runs/default)."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Absolute paths under the usual home and work roots; system paths such as /usr/local/cuda
# or Ray's /tmp/ray logs are the same on every machine and allowed.
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|root|home|Users|mnt|scratch)/[\w.-]+")


def documentation_files():
    yield os.path.join(ROOT, "README.md")
    for folder, _, files in os.walk(os.path.join(ROOT, "docs")):
        for name in files:
            if name.endswith((".md", ".csv", ".json", ".jsonl", ".txt")):
                yield os.path.join(folder, name)


def test_docs_name_no_machine_paths():
    found = []
    for path in documentation_files():
        for number, line in enumerate(open(path, encoding="utf-8"), 1):
            found += [f"{os.path.relpath(path, ROOT)}:{number}: {m}" for m in MACHINE_PATH.findall(line)]
    assert not found, "absolute paths of a machine in the docs:\n" + "\n".join(found)


def test_the_pattern_catches_machine_paths():
    assert MACHINE_PATH.findall("--logdir /work/final/default and /root/x") == ["/work/final", "/root/x"]
    assert not MACHINE_PATH.findall("/usr/local/cuda, /tmp/ray/session_latest/logs, runs/work/x")


def test_api_lists_every_mode_and_variant_of_the_table():
    """docs/API.md's mode table and DREAMER.md's estimator list follow the mode table."""
    from tpx_ext.estimators.modes import MODES, VARIANTS

    api = open(os.path.join(ROOT, "docs", "API.md")).read()
    rows = re.findall(r"^\| `([a-z-]+)` +\| `Estimator\(", api, re.M)
    assert rows == list(MODES)
    dreamer = open(os.path.join(ROOT, "docs", "DREAMER.md")).read()
    for name in VARIANTS:
        assert f"`{name}`" in api + dreamer, name
