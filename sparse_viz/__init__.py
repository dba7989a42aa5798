"""sparse_viz: train DeepSeek Sparse Attention transformers and watch which tokens they select;
probe pretrained Qwen3 / Llama-family checkpoints with token masking and ablations."""

__version__ = "0.1.0"
