"""MoCo pretraining on Ray Train: config (recipes), driver, per-worker loop, checkpoints, tracking."""
