"""Logs larger than memory: streamed Parquet datasets, hash splits, mergeable passes, Spark."""
