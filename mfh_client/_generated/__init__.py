"""Python modules generated from proto/mfh/v1/*.proto: generated; do not edit.

Regenerate with ``python scripts/gen_proto.py``; import them through ``mfh_client.proto``.
"""
