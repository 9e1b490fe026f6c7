"""Inference: preprocessing, sliding window with compact stitching, resampling back, post-processing."""
