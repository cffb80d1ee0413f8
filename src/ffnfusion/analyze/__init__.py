"""Analysis stage: which sub-blocks matter, and which FFNs depend on each other (see `analyze`)."""

from ffnfusion.analyze.stage import AnalyzeResult, analyze, parse_layers
from ffnfusion.formats.analysis import SCHEMA_VERSION, Analysis, AnalysisError, load_analysis

__all__ = ["SCHEMA_VERSION", "Analysis", "AnalysisError", "AnalyzeResult", "analyze", "load_analysis", "parse_layers"]
