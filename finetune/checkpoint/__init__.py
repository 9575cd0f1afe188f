"""Atomic checkpoints with manifests, exact resume, retention and preemption signals."""
