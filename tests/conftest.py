"""Shared pytest fixtures."""

# Local S3/GCS emulator fixtures (tests/object_store.py). Importing it first also sets
# GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false before any test imports gcsfs.
from object_store import gcs_bucket, gcs_prefix, s3_bucket, s3_prefix  # noqa: F401
