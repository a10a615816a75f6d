"""Weights from elsewhere: the one weight-file reader, conversions from transformers' and the original repository's
checkpoints, ImageNet backbone weights, and the commands' loading policy."""
