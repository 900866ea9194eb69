"""The router: one Inference endpoint for the whole mesh."""
