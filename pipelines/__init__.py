"""Ray compositions around ``moco_core``: the ``moco`` command line, ingest and pretraining jobs."""
