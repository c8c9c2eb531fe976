"""Ingest: image collections -> Parquet shards (``moco shard``) -> Ray Data streams of two views."""
