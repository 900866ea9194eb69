"""gRPC plumbing shared by every service: server lifecycle, rich errors, channels."""
