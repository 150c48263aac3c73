"""PyTorch references of the kvsurgery ops, one module per method (`core` for the store ops every recipe uses)."""
