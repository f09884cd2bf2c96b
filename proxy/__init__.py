"""respmeter: a Redis-protocol proxy that counts every command."""

__version__ = "0.1.0"
