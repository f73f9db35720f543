"""Generated from protos/mistralserve/v1/*.proto by clients/python/regenerate_stubs.py; do not edit."""
