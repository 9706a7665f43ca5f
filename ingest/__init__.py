"""Ingest: holds the upstream connection of a feed and publishes sequenced messages."""
