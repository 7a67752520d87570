"""gradalign: GradAlign gradient-aligned problem selection for GRPO (arXiv 2602.21492)."""

__version__ = "0.1.0"
