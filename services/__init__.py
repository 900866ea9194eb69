"""meshserve: a gRPC mesh that serves many ML/LLM models on a fleet of GPU hosts."""
