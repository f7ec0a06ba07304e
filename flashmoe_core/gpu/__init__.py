"""The GPU backend: MoELayer on cuda.core, its backward, single-kernel ops and traces."""
