"""The `plan` stage's latency model: decode cost per sub-block, analytic by default or measured by `bench`.

`plan --costs FILE` takes the JSON fields below or a bench.json from `ffnfusion bench` on the user's GPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ffnfusion.formats.analysis import Analysis
from ffnfusion.formats.plan import Block, Plan, plan_blocks


class CostModel(BaseModel):
    """Latency of one decode step as a sum over the fused model's blocks.

    latency = fixed + sum over blocks of (attention compute of each member with attention
              + ffn compute * fused width / base width + overhead per sequential sub-block)
    """

    model_config = ConfigDict(extra="forbid")

    attention_ms: float = Field(ge=0, description="one attention sub-block's compute")
    ffn_ms: float = Field(ge=0, description="one FFN sub-block of the base width; wider fused FFNs scale linearly")
    overhead_ms: float = Field(ge=0, description="per sequential sub-block: launches, synchronisation, all-reduce")
    fixed_ms: float = Field(ge=0, description="embeddings, final norm, lm_head, sampling")
    base_width: int = Field(gt=0, description="FFN width that ffn_ms is measured at")
    source: str = "analytic"

    @classmethod
    def analytic(
        cls, analysis: Analysis, bytes_per_param: float = 2.0, bandwidth: float = 2.0e12, overhead_ms: float = 0.01
    ) -> CostModel:
        """Batch-1 decode is memory-bound: time = weight bytes / bandwidth, plus a fixed cost per sub-block.

        Defaults: bf16 weights, 2 TB/s effective bandwidth (an H100 with HBM3), 10 us of kernel launches and
        synchronisation per sub-block in eager mode; replace with measured numbers for real predictions.
        """
        m = analysis.model
        head_dim = m.hidden_size // m.num_attention_heads
        attn_params = 2 * m.hidden_size * m.num_attention_heads * head_dim
        attn_params += 2 * m.hidden_size * m.num_key_value_heads * head_dim
        base = max(set(m.ffn_widths), key=m.ffn_widths.count)
        to_ms = bytes_per_param / bandwidth * 1e3
        return cls(
            attention_ms=attn_params * to_ms,
            ffn_ms=3 * m.hidden_size * base * to_ms,
            overhead_ms=overhead_ms,
            fixed_ms=0.0,
            base_width=base,
            source=(
                f"analytic: {bytes_per_param:g} bytes/param at {bandwidth / 1e12:g} TB/s, "
                f"{overhead_ms * 1e3:g} us per sub-block (lm_head not counted)"
            ),
        )

    @classmethod
    def load(cls, path: str | Path, analysis: Analysis) -> CostModel:
        """Measured costs from JSON; keys left out keep their analytic value, e.g. {"overhead_ms": 0.05}."""
        path = Path(path)
        if path.is_dir():
            raise ValueError(
                f"cost file {path} is a directory; --costs expects a JSON file like "
                '{"attention_ms": 0.02, "ffn_ms": 0.05}.'
            )
        try:
            measured = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"cost file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"cost file {path} is not valid JSON ({e}).") from None
        if not isinstance(measured, dict):
            raise ValueError(f'cost file {path} must hold a JSON object like {{"attention_ms": 0.02, ...}}.')
        if measured.get("format") == "ffnfusion-bench" or "models" in measured:
            return cls.from_bench(measured, analysis, path.name)
        merged = cls.analytic(analysis).model_dump() | {"source": f"measured: {path.name}"} | measured
        try:
            return cls.model_validate(merged)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise ValueError(f"cost file {path}: {problems}") from None

    @classmethod
    def from_bench(cls, bench: dict[str, Any], analysis: Analysis, name: str = "bench.json") -> CostModel:
        """Per-sub-block costs from the batch-1 decode latencies of a bench.json (`ffnfusion bench`).

        Each benchmarked model m gives t_m = memory time + fixed + overhead * depth_m. With the copy bandwidth
        bench measured on CUDA, the memory time is bench's own floor (weights + KV cache over that bandwidth):
        attention and FFN cost their weight bytes over it, and the remainder t_m - floor_m is fitted as
        fixed + overhead * depth_m (least squares over models of different depth; one depth: all of it is
        overhead). Without a bandwidth (a CPU bench) the analytic model is scaled to the original's decode time.
        In both cases the original model's predicted latency equals its measured one.
        """
        models = [m for m in bench.get("models", []) if isinstance(m, dict) and m.get("runs")]
        points = []
        for m in models:
            runs = sorted((r for r in m["runs"] if "decode_ms_per_token" in r), key=lambda r: r.get("batch", 1))
            if runs and "sequential_sub_blocks" in m:
                points.append((m, runs[0]))
        if not points:
            raise ValueError(f"cost file {name}: a bench.json without decode latencies (run `ffnfusion bench`).")
        batch = points[0][1].get("batch", 1)
        n = analysis.num_layers
        widths = analysis.model.ffn_widths
        analytic = cls.analytic(analysis)
        ref_model, ref_run = max(points, key=lambda p: p[0]["sequential_sub_blocks"])
        t_ref = ref_run["decode_ms_per_token"]
        where = f"{name}, batch {batch}, {bench.get('device_name', bench.get('device', 'device'))}"
        if ref_model["sequential_sub_blocks"] != 2 * n:
            where += f"; its deepest model has {ref_model['sequential_sub_blocks']} sub-blocks, not {2 * n}"
        bandwidth = bench.get("copy_bandwidth_GBps")
        floors = [(p[0]["sequential_sub_blocks"], p[1]) for p in points if "decode_floor_ms" in p[1]]
        if not bandwidth or len(floors) != len(points):
            original = Plan()
            scale = t_ref / analytic.latency_ms(plan_blocks(original, n), widths)
            values = analytic.model_dump() | {
                k: getattr(analytic, k) * scale for k in ("attention_ms", "ffn_ms", "overhead_ms", "fixed_ms")
            }
            return cls.model_validate(
                values | {"source": f"analytic scaled x{scale:.3g} to the measured decode time ({where})"}
            )
        bytes_per_param = 4.0 if bench.get("dtype") == "float32" else 2.0
        memory = cls.analytic(analysis, bytes_per_param=bytes_per_param, bandwidth=bandwidth * 1e9)
        depths = [d for d, _ in floors]
        rest = [r["decode_ms_per_token"] - r["decode_floor_ms"] for _, r in floors]
        if len(set(depths)) >= 2:
            mean_d, mean_r = sum(depths) / len(depths), sum(rest) / len(rest)
            var = sum((d - mean_d) ** 2 for d in depths)
            overhead = max(sum((d - mean_d) * (r - mean_r) for d, r in zip(depths, rest)) / var, 0.0)
        else:
            overhead = max(rest[0], 0.0) / depths[0]
        model = cls(
            attention_ms=memory.attention_ms,
            ffn_ms=memory.ffn_ms,
            overhead_ms=overhead,
            fixed_ms=0.0,
            base_width=analytic.base_width,
            source=f"measured: {where}; memory time at {bandwidth:.0f} GB/s copy bandwidth",
        )
        fixed = t_ref - model.latency_ms(plan_blocks(Plan(), n), widths)
        return model.model_copy(update={"fixed_ms": max(fixed, 0.0)})

    def block_ms(self, block: Block, widths: list[int]) -> float:
        if block.kind == "parallel":
            members = len(block.layers)
            compute = members * self.attention_ms
        else:
            compute = self.attention_ms if block.attention_from is not None else 0.0
        width = sum(widths[i] for i in block.ffn_from)
        compute += self.ffn_ms * width / self.base_width
        return compute + self.overhead_ms * block.sequential_sub_blocks

    def latency_ms(self, blocks: list[Block], widths: list[int]) -> float:
        return self.fixed_ms + sum(self.block_ms(b, widths) for b in blocks)
