from __future__ import annotations

from PIL import Image

from ffnfusion.formats.plan import Plan
from ffnfusion.report.diagram import plot_plan


def test_plan_diagram_is_written(tmp_path) -> None:
    plan = Plan(remove_attention=[3, 4, 5], fuse_ffn=[[2, 3, 4]], parallel_blocks=[[7, 8]])
    path = plot_plan(plan, 10, tmp_path / "plan.png")
    with Image.open(path) as img:
        assert img.width > 400 and img.height > 150
        colors = {c for _, c in img.convert("RGB").getcolors(maxcolors=1 << 20)}
    # the fused-FFN and parallel-block colours appear
    assert (0xDD, 0x84, 0x52) in colors and (0x81, 0x72, 0xB3) in colors
