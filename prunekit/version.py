"""The package version (read by reports and benchmarks)."""
__version__ = "0.1.0"
