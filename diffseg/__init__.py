"""DiffSeg in PyTorch."""
