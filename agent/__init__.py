"""mtls-agent: a local credential agent for mutual TLS."""

__version__ = "0.1.0"
APP_NAME = "mtls-agent"
