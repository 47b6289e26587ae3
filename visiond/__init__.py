"""visiond: a real-time vision daemon for factory lines."""

__version__ = "0.1.0"
