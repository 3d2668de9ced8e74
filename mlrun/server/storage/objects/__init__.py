"""Artifact objects: the S3 store (presigned URLs, multipart) and the local store (signed,
expiring URLs served by this process)."""
