"""Generated from protos/meshserve/v1 by scripts/gen_protos.py."""
