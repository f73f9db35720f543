"""The gRPC front-end: the GenerationService over ``server.frontend``, health, reflection."""
