"""The transfer core: plan which weights feed which, decompose, project, report.

``planning`` (source → target weight pairs), ``kernels`` (jitted linear algebra),
``engine`` (streamed execution), ``cache`` (on-disk subspace cache), ``sharding``
(layer axis over devices), ``report``, ``pytree_api`` (the same on in-memory pytrees).
"""
