"""Inference benchmark: a graph-captured static-cache decode engine, and the `bench` stage built on it."""

from ffnfusion.bench.engine import DecodeEngine, Timing
from ffnfusion.bench.measure import bench, ffn_group_probe
from ffnfusion.bench.shapes import SHAPES, random_model

__all__ = ["SHAPES", "DecodeEngine", "Timing", "bench", "ffn_group_probe", "random_model"]
