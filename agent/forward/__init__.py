"""The data plane: the proxy socket's HTTP/1.1 → mTLS relay."""

from agent.forward.relay import ProxyServer

__all__ = ["ProxyServer"]
