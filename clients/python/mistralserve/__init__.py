"""mistral-serve's client distribution: ``mistralserve.v1`` (generated stubs) and ``mistralserve.client``."""
