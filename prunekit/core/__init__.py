"""The floor every method stands on; it knows no method (see ARCHITECTURE.md)."""
