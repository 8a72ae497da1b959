"""Reports: JSON (the source of truth) and a markdown rendering of it."""
from .markdown import report_markdown, write_report  # noqa: F401
