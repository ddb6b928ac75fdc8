"""The lab: pretrain, fine-tune, compare and report subspace optimizers (depends on the library)."""
