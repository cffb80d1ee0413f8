"""`ffnfusion export`: a fused checkpoint in a serving engine's own file format (today: llama.cpp's GGUF)."""

from ffnfusion.export.gguf import FILE_TYPES, ExportError, ExportSummary, export_gguf

FORMATS = ("gguf",)

__all__ = ["FILE_TYPES", "FORMATS", "ExportError", "ExportSummary", "export_gguf"]
