"""Evaluation: linear probe, kNN, export of pretrained backbones."""
