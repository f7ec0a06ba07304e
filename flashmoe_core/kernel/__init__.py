"""What both backends of the fused kernel share: kernel specs, JIT, buffer plans, the
expert-parallel protocol as data, the kernel's inputs and records, the training logic."""
