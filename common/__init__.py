"""What ingest and edge share: configuration, channels, protocol, Redis keys and scripts."""

__version__ = "0.1.0"
