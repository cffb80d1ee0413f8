"""The `report` stage: a run folder's stage files -> report.md / report.html with plots."""

from ffnfusion.report.stage import ReportError, build_report, write_report

__all__ = ["ReportError", "build_report", "write_report"]
