"""MoE Merge Studio: build Mixture-of-Experts models from dense fine-tunes, chat with them, watch them route."""

__version__ = "0.1.0"
