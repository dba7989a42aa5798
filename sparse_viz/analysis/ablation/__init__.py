"""Ablation: remove heads or rank-1 weight components and measure the change of the next-token distribution."""
