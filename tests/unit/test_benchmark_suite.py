"""The benchmark suite's bookkeeping (not timings): per-round ratios, target checks within the
measured noise, and the README tables rewritten between their markers only."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.suite import Check, Ratio, Result, update_readme


def test_ratios_are_taken_round_by_round() -> None:
    # the second series is uniformly 10% slower, though both drift by 3x over the rounds
    first = [1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 1.0, 2.0]
    ratio = Ratio.of([1.1 * x for x in first], first)
    assert ratio.value == pytest.approx(1.1) and ratio.noise == pytest.approx(0.0, abs=1e-12)
    spread = Ratio.spread([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spread.value == 3.0 and spread.low < 3.0 < spread.high


def test_a_target_is_missed_only_beyond_the_runs_noise() -> None:
    assert Check("x", 1.04, 1.03, noise=0.02).passed
    assert not Check("x", 1.06, 1.03, noise=0.02).passed
    assert not Check("x", 1.031, 1.03, noise=0.0).passed


def test_the_readme_table_is_rewritten_between_its_markers_only(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- benchmark:demo -->\nold table\n<!-- /benchmark:demo -->\noutro\n")
    result = Result(name="demo", title="t", columns=["method", "ratio"], rows=[["lora", "1.00x"]], data={},
                    notes=["a note"])
    source = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "demo.json"
    assert update_readme(result, source, readme)
    text = readme.read_text()
    assert text.startswith("intro\n<!-- benchmark:demo -->\n| method | ratio |") and text.endswith("outro\n")
    assert "| lora | 1.00x |" in text and "a note" in text and "old table" not in text
    assert "benchmarks/results/demo.json" in text
    other = Result(name="absent", title="t", columns=["a"], rows=[], data={})
    assert not update_readme(other, source, readme)


def test_the_notes_under_a_table_name_each_missed_target(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("<!-- benchmark:demo -->\n<!-- /benchmark:demo -->\n")
    source = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "demo.json"
    checks = [Check("lora / floor", 1.01, 1.03, 0.01), Check("bitfit / floor", 1.20, 1.03, 0.02)]
    update_readme(Result(name="demo", title="t", columns=["a"], rows=[], data={}, checks=checks), source, readme)
    text = readme.read_text()
    assert "Targets missed in this run (1 of 2): bitfit / floor 1.20 (target 1.03, noise 2%)" in text
    assert "lora / floor" not in text
    update_readme(Result(name="demo", title="t", columns=["a"], rows=[], data={}, checks=checks[:1]), source,
                  readme)
    assert "Targets: all 1 met in this run" in readme.read_text()
