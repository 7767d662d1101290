"""Ingest: turning a user's photo sources into checked, hashed records (the collect stage).

Owns the source readers (folders, archives, CSV/JSONL catalogs: `sources`), the catalog
downloader (`download`) and the perceptual hash (`hashing`). Every input record comes out
accepted or quarantined with a reason.
"""
