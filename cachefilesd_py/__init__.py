"""cachefilesd-py: a Python replacement for the Linux cachefilesd daemon."""

__version__ = "0.1.0"
