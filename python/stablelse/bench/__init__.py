"""``python -m stablelse bench``: stablelse against its peers, next to this machine's ceiling.

Times stablelse and every installed peer (NumPy's stable formula written by hand,
``scipy.special``, torch, JAX jitted) in the same process, on long rows, short rows (every op
on 10 and 32 classes; ``--short-rows`` keeps only those), one long row, a batch in L2 and
single small calls, and measures the DRAM read and
read+write bandwidth in the same run with the native probe (``stablelse._core.BandwidthProbe``,
sized from the last-level cache). Missing peers are skipped and the report says so.

Effective bandwidth is ``bytes the op must read + bytes it must write`` over the best time of
several calls: float32 logits read once, the result (and gradient) written once, int64 targets
read once; temporaries a library chooses to make are its own cost. The ceiling for an op that
writes as much as it reads is the read+write probe, for the others the read probe.

``--accuracy`` reports instead the largest float32 error in ULPs of logsumexp and log_softmax
against an exact float64 reference for stablelse and each peer; ``--plot`` adds a sweep of
row lengths at a fixed total size, one panel per op (reductions and losses), and a panel of
the short-row workloads' GB/s per library; the table names each workload's fastest peer and
stablelse's speed-up over it (``fastest_peer`` in the JSON); ``--cuda`` runs
the GPU benchmark (:mod:`stablelse.bench.cuda`). ``python -m stablelse.bench.dask`` times the
Dask front door on a local cluster.

Modules: :mod:`~stablelse.bench.workloads` (what is timed and the bytes it moves),
:mod:`~stablelse.bench.peers` (how each library runs an op), :mod:`~stablelse.bench.timing`
(sampling in turns, the probe, the machine), :mod:`~stablelse.bench.accuracy`,
:mod:`~stablelse.bench.report` (tables, plot, JSON) and :mod:`~stablelse.bench.cli`.
"""

from .cli import build_parser, main

__all__ = ["build_parser", "main"]
