"""Sparse evaluation: a pretrained model attending to k selected keys per layer, scored by perplexity and by how much of its dense attention each selection keeps."""
