"""Token masking: the change of a layer's update at the final position when one key is hidden from it."""
