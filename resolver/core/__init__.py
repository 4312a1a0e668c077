"""The sans-IO core: bytes and `now` in, bytes and decisions out.

Nothing under this package imports trio, socket, time or prometheus_client.
"""
