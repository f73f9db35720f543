"""The model layer: Mistral/Llama decoder, checkpoint loaders, KV caches and attention.

Knows nothing of requests; callers hand it token ids, positions and attention metadata.
"""
