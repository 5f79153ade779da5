"""Prompt data: records, shards (webdataset tars), the deterministic global order and its cursor, and
object-storage access (`storage.py`, the only s3fs user)."""
