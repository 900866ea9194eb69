"""The node agent: devices, engines, reconciliation towards placements, Inference server."""
