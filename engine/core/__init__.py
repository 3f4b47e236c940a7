"""The engine core: request lifecycle, the step scheduler, and the loop that drives the executor."""
