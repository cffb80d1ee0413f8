"""`ffnfusion cache` lists each kind's entries and bytes and clears only the kinds asked for, never other files."""

from __future__ import annotations

from typer.testing import CliRunner

from ffnfusion.cli import app
from ffnfusion.io.cache import CACHE_KINDS, cache_usage, clear_cache


def fill(root):
    """Two entries of known sizes in every kind, and files of the user's beside them."""
    sizes = {}
    for n, kind in enumerate(CACHE_KINDS):
        (root / kind / "a" / "deep").mkdir(parents=True)
        (root / kind / "a" / "deep" / "x.bin").write_bytes(b"x" * (1000 + n))
        (root / kind / "b.json").write_bytes(b"y" * (10 * (n + 1)))
        sizes[kind] = 1000 + n + 10 * (n + 1)
    (root / "mine.txt").write_text("not ffnfusion's")
    (root / "other_tool").mkdir()
    (root / "other_tool" / "data.bin").write_bytes(b"z" * 50)
    return sizes


def test_usage_counts_every_kind(tmp_path) -> None:
    sizes = fill(tmp_path)
    usage = cache_usage(tmp_path)
    assert [u.kind for u in usage] == list(CACHE_KINDS)
    assert {u.kind: (u.entries, u.bytes) for u in usage} == {k: (2, v) for k, v in sizes.items()}
    assert all(u.entries == 0 and u.bytes == 0 for u in cache_usage(tmp_path / "missing"))


def test_clear_removes_only_the_kinds_asked_for(tmp_path) -> None:
    sizes = fill(tmp_path)
    assert clear_cache(["gguf_weights", "eval_scores"], tmp_path) == sizes["gguf_weights"] + sizes["eval_scores"]
    assert not (tmp_path / "gguf_weights").exists() and not (tmp_path / "eval_scores").exists()
    assert (tmp_path / "self_corpus" / "a" / "deep" / "x.bin").is_file()
    assert (tmp_path / "mine.txt").read_text() == "not ffnfusion's"
    assert (tmp_path / "other_tool" / "data.bin").stat().st_size == 50


def test_cli_lists_clears_all_and_refuses_unknown_kinds(tmp_path, monkeypatch) -> None:
    sizes = fill(tmp_path)
    monkeypatch.setenv("FFNFUSION_CACHE", str(tmp_path))
    listed = CliRunner().invoke(app, ["cache"], terminal_width=200)
    assert listed.exit_code == 0, listed.output
    assert "gguf_weights" in listed.output and f"{sizes['gguf_weights'] / 1e3:.1f} kB" in listed.output
    bad = CliRunner().invoke(app, ["cache", "--clear", "models"])
    assert bad.exit_code == 2 and "unknown cache kinds ['models']" in bad.output
    assert (tmp_path / "gguf_weights").is_dir()  # nothing cleared by a refused command
    cleared = CliRunner().invoke(app, ["cache", "--clear", "all"], terminal_width=200)
    assert cleared.exit_code == 0, cleared.output
    assert f"{sum(sizes.values()) / 1e3:.1f} kB freed" in cleared.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt", "other_tool"]
