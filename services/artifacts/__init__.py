"""Model artifacts from a registry: manifests that pin them, S3 access, the node cache."""
