"""The RoE variant: per-example layer routing with adapter shortcuts."""
