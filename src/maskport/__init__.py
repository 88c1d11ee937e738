"""maskport: training checkpoints of segmentation MLLMs -> verified, deployable HuggingFace models."""

__version__ = "0.1.0"
