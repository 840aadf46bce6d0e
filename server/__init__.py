"""steerserve's server: settings, model loading, the engine and the HTTP API."""

__version__ = "0.1.0"
