"""rawproxy: a WebSocket-aware HTTP/1.1 reverse proxy."""

__version__ = "0.1.0"
