"""facebookresearch/DiT checkpoints (work in progress)."""
