"""Generated from protos/meshserve/kserve by scripts/gen_protos.py."""
