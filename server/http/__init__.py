"""The HTTP front-end: OpenAI's and Workers AI's APIs and the playground over ``server.frontend``."""
