"""scripts/mutation.py's report: statuses from mutmut's .meta files, scores, equivalents."""

import importlib.util
import json
from pathlib import Path

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
    meta.write_text(json.dumps({"exit_code_by_key": codes}))
    (tmp_path / "equivalent.json").write_text(json.dumps({"m.f__mutmut_3": "same value"}))
    monkeypatch.setattr(mod, "diff", lambda name: f"-a\n+b ({name})")
    mod.write_report(120.0, "make mutation")
    text = (tmp_path / "MUTATION.md").read_text()
    # 7 mutants: 2 killed, 1 unexplained survivor, 1 equivalent, 1 timeout, 1 no tests,
    # 1 not checked; score = 2 / (6 checked - 1 equivalent - 1 no tests) = 50%
    assert "| `tpx_ext/m.py` | 7 | 2 | 1 | 1 | 1 | 1 | 1 | 50% |" in text
    assert "- `m.f__mutmut_3`: same value" in text
    assert "+b (m.f__mutmut_4)" in text and "m.f__mutmut_3`\n\n```diff" not in text
    assert "2 min on this run" in text
