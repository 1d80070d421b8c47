"""The Lightning layer: the callback, the end-of-fit pipeline, evaluation, report, preflight, checkpoint I/O."""
