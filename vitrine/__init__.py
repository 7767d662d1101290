"""Shared library of the vitrine pipeline: configuration, image decoding, shards and models."""
