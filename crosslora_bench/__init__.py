"""Support code for benchmarks, demos and tests (needs torch): real models, text, timing.

Not part of the runtime package: ``import crosslora_jax`` never imports this.
"""
