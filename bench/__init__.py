"""prunekit's benchmarks. Each script runs as a module from the repository root (``python -m bench.quality``);
what they share (protocols, environment record, result files, tables, timing, models) is in :mod:`bench.lib`,
so that a script only wires those pieces to prunekit. Results go to bench/results/."""
