"""Evaluation of frozen features (paper §7): k-NN, linear probes, logistic regression,
instance retrieval, dense probes (segmentation, depth) and pictures (PCA of patch
features, neighbour grids, per-class accuracy)."""
