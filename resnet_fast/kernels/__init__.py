"""Kernel implementations below the ops layer (no torch.library registration here)."""
