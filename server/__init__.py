"""Process entry, CLI, tokenizers and chat templates; the gRPC server lands in a later issue."""
