"""scripts/mutation.py's report: statuses from mutmut's .meta files, scores, equivalents."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "mutation.py"


def load(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("mutation_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "ROOT", tmp_path)
    monkeypatch.setattr(mod, "REPORT", tmp_path / "MUTATION.md")
    monkeypatch.setattr(mod, "EQUIVALENT", tmp_path / "equivalent.json")
    return mod


def test_report_counts_statuses_and_scores_without_equivalents(tmp_path, monkeypatch):
    mod = load(tmp_path, monkeypatch)
    meta = tmp_path / "mutants" / "tpx_ext" / "m.py.meta"
    meta.parent.mkdir(parents=True)
    codes = {"m.f__mutmut_1": 1, "m.f__mutmut_2": 3, "m.f__mutmut_3": 0, "m.f__mutmut_4": 0,
             "m.f__mutmut_5": 36, "m.f__mutmut_6": None, "m.f__mutmut_7": 33}
    # durations of 3 mutants with a verdict (3600 s in all) and of the unchecked one (not counted)
    durations = {"m.f__mutmut_1": 1000.0, "m.f__mutmut_2": 2000.0, "m.f__mutmut_3": 600.0,
                 "m.f__mutmut_6": 5000.0}
    meta.write_text(json.dumps({"exit_code_by_key": codes, "durations_by_key": durations}))
    (tmp_path / "equivalent.json").write_text(json.dumps(
        {"m.f__mutmut_3": {"reason": "same value", "mutation": "b (m.f__mutmut_3)"}}))
    monkeypatch.setattr(mod, "full_diff", lambda name: f"--- f\n+++ f\n-a\n+b ({name})")
    mod.write_report(120.0, "make mutation")
    text = (tmp_path / "MUTATION.md").read_text()
    # 7 mutants: 2 killed, 1 unexplained survivor, 1 equivalent, 1 timeout, 1 no tests,
    # 1 not checked; score = 2 / (6 checked - 1 equivalent - 1 no tests) = 50%
    assert "| `tpx_ext/m.py` | 7 | 2 | 1 | 0 | 1 | 1 | 1 | 1 | 50% | 50% |" in text
    assert "- `m.f__mutmut_3`: same value" in text
    assert "+b (m.f__mutmut_4)" in text and "m.f__mutmut_3`\n\n```diff" not in text
    assert "2 min on this run" in text
    assert "Mutant time: 1.0 h, the sum of the durations mutmut recorded for the 3 mutants" in text
    assert "**Partial report**: 1 mutants are not checked yet" in text
    codes["m.f__mutmut_6"] = 1
    meta.write_text(json.dumps({"exit_code_by_key": codes}))
    mod.write_report(120.0, "make mutation")
    assert "Partial report" not in (tmp_path / "MUTATION.md").read_text()


def test_an_entry_explains_only_the_mutation_it_recorded(tmp_path, monkeypatch):
    """An edit renumbers a function's mutants: an entry whose survivor now makes another
    change explains nothing (the survivor is listed with its diff) and is reported as stale,
    as is an entry whose mutant was killed; a malformed entry stops the report; --explain
    records a survivor with its lines and refuses a mutant that is not one."""
    mod = load(tmp_path, monkeypatch)
    meta = tmp_path / "mutants" / "tpx_ext" / "m.py.meta"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"exit_code_by_key": {"m.f__mutmut_1": 0, "m.f__mutmut_2": 1,
                                                     "m.f__mutmut_3": 0}}))
    monkeypatch.setattr(mod, "full_diff", lambda name: f"--- f\n+++ f\n-a\n+    b ({name})")
    entries = {"m.f__mutmut_1": {"reason": "r1", "mutation": "c (m.f__mutmut_1)"},
               "m.f__mutmut_2": {"reason": "r2", "mutation": "b (m.f__mutmut_2)"}}
    (tmp_path / "equivalent.json").write_text(json.dumps(entries))
    mod.write_report(None, "make mutation")
    text = (tmp_path / "MUTATION.md").read_text()
    assert "| `tpx_ext/m.py` | 3 | 1 | 2 | 0 | 0 | 0 | 0 | 0 | 33% | 33% |" in text
    assert "+    b (m.f__mutmut_1)" in text and "r1" not in text
    stale = text.split("## Stale equivalence entries")[1]
    assert "- `m.f__mutmut_1` (survived; recorded: `c (m.f__mutmut_1)`)" in stale
    assert "- `m.f__mutmut_2` (killed; recorded: `b (m.f__mutmut_2)`)" in stale

    mod.explain("m.f__mutmut_1", "same value")
    entries = json.loads((tmp_path / "equivalent.json").read_text())
    assert entries["m.f__mutmut_1"] == {"reason": "same value", "mutation": "b (m.f__mutmut_1)"}
    mod.write_report(None, "make mutation")
    assert "- `m.f__mutmut_1`: same value" in (tmp_path / "MUTATION.md").read_text()
    with pytest.raises(SystemExit, match="m.f__mutmut_2 is killed, not a survivor"):
        mod.explain("m.f__mutmut_2", "why")
    with pytest.raises(SystemExit, match="m.f__mutmut_9 is not a mutant of the scope"):
        mod.explain("m.f__mutmut_9", "why")
    (tmp_path / "equivalent.json").write_text(json.dumps({"m.f__mutmut_1": "a bare reason"}))
    with pytest.raises(SystemExit, match=r"each entry must be .* not so: m.f__mutmut_1"):
        mod.write_report(None, "make mutation")


def test_message_wording_is_told_apart_from_behaviour(tmp_path, monkeypatch):
    mod = load(tmp_path, monkeypatch)
    wording = ('@@\n     if x < 0:\n         raise ValueError("f: x must be >= 0 "\n'
               '-                         "(got a negative)")\n'
               '+                         "XX(got a negative)XX")\n')
    case = ('@@\n     if x:\n-        warnings.warn("Sigma is NaN")\n'
            '+        warnings.warn("sigma is nan")\n')
    key = ('@@\n     def f(name):\n-        return name == "rho"\n'
           '+        return name == "XXrhoXX"\n')
    outside = ('@@\n     def f():\n-        return {"mode": 1}\n+        return {"XXmodeXX": 1}\n')
    lost = ('@@\n     if x < 0:\n-        raise ValueError("f: x must be >= 0")\n'
            '+        raise ValueError(None)\n')
    assert mod.message_wording_only(wording) and mod.message_wording_only(case)
    assert not any(mod.message_wording_only(d) for d in (key, outside, lost))

    meta = tmp_path / "mutants" / "tpx_ext" / "m.py.meta"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"exit_code_by_key": {"m.f__mutmut_1": 1, "m.f__mutmut_2": 0,
                                                     "m.f__mutmut_3": 0}}))
    diffs = {"m.f__mutmut_2": wording, "m.f__mutmut_3": lost}
    monkeypatch.setattr(mod, "full_diff", diffs.get)
    mod.write_report(None, "make mutation")
    text = (tmp_path / "MUTATION.md").read_text()
    # score = 1 / 3 checked; behaviour score = 1 / (3 - 1 wording)
    assert "| `tpx_ext/m.py` | 3 | 1 | 1 | 1 | 0 | 0 | 0 | 0 | 33% | 50% |" in text
    assert '- `m.f__mutmut_2`: `"XX(got a negative)XX")`' in text
    assert "+        raise ValueError(None)" in text


def test_recheck_resets_only_the_named_survivors_and_untested(tmp_path, monkeypatch):
    mod = load(tmp_path, monkeypatch)
    meta = tmp_path / "mutants" / "tpx_ext" / "m.py.meta"
    meta.parent.mkdir(parents=True)
    codes = {"tpx_ext.m.f__mutmut_1": 0, "tpx_ext.m.f__mutmut_2": 1, "tpx_ext.m.f__mutmut_3": 33,
             "tpx_ext.m.f__mutmut_4": 36, "tpx_ext.n.g__mutmut_1": 0}
    meta.write_text(json.dumps({"exit_code_by_key": codes, "durations_by_key": {}}))
    assert mod.reset_survivors(["tpx_ext.m"]) == 2
    data = json.loads(meta.read_text())
    assert data["exit_code_by_key"] == {"tpx_ext.m.f__mutmut_1": None, "tpx_ext.m.f__mutmut_2": 1,
                                        "tpx_ext.m.f__mutmut_3": None, "tpx_ext.m.f__mutmut_4": 36,
                                        "tpx_ext.n.g__mutmut_1": 0}
    assert data["durations_by_key"] == {}
    assert mod.reset_survivors([]) == 1
    # --recheck: the named mutants whatever their verdict, and no survivor besides
    codes = {"tpx_ext.m.f__mutmut_1": 1, "tpx_ext.m.f__mutmut_2": 0, "tpx_ext.m.f__mutmut_3": 1}
    meta.write_text(json.dumps({"exit_code_by_key": codes}))
    assert mod.reset_survivors(None, ["tpx_ext.m.f__mutmut_3", "tpx_ext.m.f__mutmut_9"]) == 1
    assert json.loads(meta.read_text())["exit_code_by_key"] == {
        "tpx_ext.m.f__mutmut_1": 1, "tpx_ext.m.f__mutmut_2": 0, "tpx_ext.m.f__mutmut_3": None}
    meta.write_text(json.dumps({"exit_code_by_key": codes}))
    assert mod.reset_survivors([], ["tpx_ext.m.f__mutmut_1"]) == 2  # with --recheck-survivors


def test_under_mutation_tests_run_fastest_first_without_the_slow_ones(tmp_path, monkeypatch):
    """conftest.py's hook: with MUTANT_UNDER_TEST naming a mutant, the collected tests are
    ordered by mutmut's recorded durations and those over the limit are deselected (kept
    for the trainer's mutants); without a mutant, nothing changes."""
    import conftest
    from types import SimpleNamespace
    (tmp_path / "mutmut-stats.json").write_text(json.dumps(
        {"duration_by_test": {"t::slow": 60.0, "t::mid": 2.0, "t::fast": 0.1}}))
    deselected = []
    config = SimpleNamespace(rootpath=tmp_path, hook=SimpleNamespace(
        pytest_deselected=lambda items: deselected.extend(i.nodeid for i in items)))

    def run(mutant):
        items = [SimpleNamespace(nodeid=n) for n in ("t::slow", "t::new", "t::mid", "t::fast")]
        deselected.clear()
        monkeypatch.setenv("MUTANT_UNDER_TEST", mutant)
        conftest.pytest_collection_modifyitems(config, items)
        return [i.nodeid for i in items], list(deselected)

    assert run("tpx_ext.ops.x_f__mutmut_3") == (["t::new", "t::fast", "t::mid"], ["t::slow"])
    assert run("tpx_ext.dreamer.train.x_f__mutmut_3") == (["t::new", "t::fast", "t::mid", "t::slow"], [])
    assert run("") == (["t::slow", "t::new", "t::mid", "t::fast"], [])


def test_under_mutation_a_test_past_its_time_limit_fails(tmp_path, monkeypatch):
    """conftest.py's timer: with MUTANT_UNDER_TEST naming a mutant, a test that runs past
    its limit of CPU time fails with MutantTimeout (an endless loop is caught) while one
    that waits as long does not (a paused or starved worker is not looping), and the timer
    is gone afterwards; without a mutant no timer is set."""
    import signal
    import time
    from types import SimpleNamespace
    import conftest
    (tmp_path / "mutmut-stats.json").write_text(json.dumps({"duration_by_test": {"t::loop": 0.01}}))
    item = SimpleNamespace(nodeid="t::loop", config=SimpleNamespace(rootpath=tmp_path))
    monkeypatch.setattr(conftest, "MUTATION_TIMEOUT_FLOOR_S", 0.2)
    monkeypatch.setenv("MUTANT_UNDER_TEST", "m.f__mutmut_1")
    hook = conftest.pytest_runtest_call(item)
    next(hook)
    time.sleep(0.5)  # 0.5 s of wall time, almost no CPU time
    with pytest.raises(conftest.MutantTimeout, match=r"^t::loop ran over 0.2 s under m.f__mutmut_1$"):
        while True:
            sum(range(1000))
    with pytest.raises(StopIteration):
        hook.send(None)
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)
    monkeypatch.setenv("MUTANT_UNDER_TEST", "")
    hook = conftest.pytest_runtest_call(item)
    next(hook)
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)


def test_the_report_states_the_limits_conftest_applies(tmp_path, monkeypatch):
    """The header's test limits are read from conftest.py's source, so they are the values
    the run used: the real ones, and a changed conftest's."""
    import functools

    import conftest
    mod = load(tmp_path, monkeypatch)
    assert mod.conftest_limits() == {
        "MUTATION_TEST_LIMIT_S": conftest.MUTATION_TEST_LIMIT_S,
        "MUTATION_TIMEOUT_FACTOR": conftest.MUTATION_TIMEOUT_FACTOR,
        "MUTATION_TIMEOUT_FLOOR_S": conftest.MUTATION_TIMEOUT_FLOOR_S}
    changed = tmp_path / "conftest.py"
    changed.write_text("import os\nMUTATION_TEST_LIMIT_S = 2.5\nOTHER = 1\n"
                       "MUTATION_TIMEOUT_FACTOR, MUTATION_TIMEOUT_FLOOR_S = 4, 30.0\n")
    monkeypatch.setattr(mod, "conftest_limits", functools.partial(mod.conftest_limits, changed))
    (tmp_path / "mutants").mkdir()
    mod.write_report(None, "make mutation")
    text = (tmp_path / "MUTATION.md").read_text()
    assert ("without those slower than 2.5 s except for train.py's mutants, and a test that "
            "runs 4 times its recorded duration in CPU time (at least 30 s) fails") in text
