"""Progress of long stages where output is not a terminal: plain lines at a fixed cadence, besides the final bar."""

from __future__ import annotations

import ffnfusion.io.progress as progress
from ffnfusion.io.progress import progress_bar


def test_a_log_file_gets_a_line_at_each_interval(monkeypatch, capsys) -> None:
    monkeypatch.setattr(progress, "LOG_EVERY_SECONDS", 0.0)  # every advance is an interval
    with progress_bar(True, 10, "analyzing", "sub-blocks", completed=2) as advance:
        for _ in range(4):
            advance(2)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("analyzing: ")]
    assert [line.split(",")[0] for line in lines] == [f"analyzing: {n}/10 sub-blocks" for n in (4, 6, 8, 10)]
    assert all(line.split(", ")[1].endswith(" s") for line in lines)


def test_no_extra_lines_within_an_interval_and_none_when_hidden(capsys) -> None:
    with progress_bar(True, 1000, "writing corpus", "tokens") as advance:
        for _ in range(100):
            advance(10)  # well within LOG_EVERY_SECONDS
    out = capsys.readouterr().out
    assert "writing corpus: " not in out and "1000/1000" in out  # the finished bar only
    with progress_bar(False, 10, "analyzing") as advance:
        assert advance is None
