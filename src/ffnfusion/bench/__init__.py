"""Inference benchmark: a graph-captured static-cache decode engine, and the `bench` stage built on it."""

from ffnfusion.bench.engine import DecodeEngine, Timing
from ffnfusion.bench.shapes import SHAPES, random_model
from ffnfusion.bench.stage import bench
from ffnfusion.bench.timing import ffn_group_probe

__all__ = ["SHAPES", "DecodeEngine", "Timing", "bench", "ffn_group_probe", "random_model"]
