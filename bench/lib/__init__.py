"""What the benchmark scripts share, one module per idea:

- ``paths``: the repository, bench/results/, the shared read-only data;
- ``protocols``: the calibration / evaluation protocols (S, P, S-c4) and the device-dependent default;
- ``env``: the environment record stored with every result (machine, versions, measured commit, date);
- ``results``: loading, merging and atomically saving bench/results/*.json, and resuming keyed runs;
- ``tables``: markdown tables and cells;
- ``timing``: wall-clock timing, peak memory, per-phase timers;
- ``models``: the models a benchmark loads, a protocol's windows and its perplexity, dense-weight snapshots;
- ``upcycle``: a dense model upcycled into a mixture of experts (a Mixtral), for the MoE benchmark;
- ``pipelines``: keys, descriptions and groupings of pipeline configurations (quality and grid runs);
- ``dense_stats``: protocol G's screening proxy (dense statistics gathered once, every pipeline pruned from them).
"""
