"""A caching, forwarding DNS resolver sidecar for mail servers.

It answers the MTA on loopback and treats every upstream packet as precious.
"""

__version__ = "0.1.0"
