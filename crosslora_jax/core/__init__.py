"""The transfer core, shared by every method: plan, decompose, project, calibrate, report.

``engine`` (the pipeline: open → plan → project → refine → results), ``planning``
(source → target weight pairs), ``subspaces`` (per-model SVDs, cached or batched),
``kernels`` (jitted linear algebra), ``calibration`` (norm calibration and the
relative-update report), ``cache`` (on-disk subspace cache, cache root), ``sharding``
(layer axis over devices, BLAS threads), ``report``, ``pytree_api`` (the same on
in-memory pytrees).
"""
