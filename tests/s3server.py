"""The registry tests' S3 server: meshserve.artifacts.local_s3 (SeaweedFS on loopback)."""

from meshserve.artifacts.local_s3 import BUCKET, S3Server, credentials, start

__all__ = ["BUCKET", "S3Server", "credentials", "start"]
