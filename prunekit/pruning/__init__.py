"""Pruning a model: the configured run (config, plan, layer pruner, report, save)."""
