"""Generated stubs of the downpour.v1 wire contract (see proto/downpour/v1/).

Regenerate with ``python scripts/gen_protos.py``; do not edit by hand.
"""
