"""A short deterministic fuzz run (tests/fuzzing.py): mutants of real checkpoints load or are refused in one line.

48 mutants of seed 0, three entry points each, in watched children; the longer run is
`python -m benchmarks.fuzz --minutes N`.
"""

from __future__ import annotations

import fuzzing

CASES = 48


def test_short_fuzz_run_has_no_findings(tmp_path) -> None:
    stats = fuzzing.campaign(tmp_path, seed=0, cases=CASES, timeout=10.0, out=tmp_path / "findings")
    assert stats["cases"] == CASES and stats["runs"] == 3 * CASES
    assert len(stats["outcomes"]) >= 10, "the mutants should reach many different outcomes"
    found = [f"{name}: {o.entry}: {o.finding}: {o.detail[:200]}" for name, o in stats["findings"]]
    assert not found, f"{len(found)} findings (reproducers in {tmp_path / 'findings'}):\n" + "\n".join(found[:30])
