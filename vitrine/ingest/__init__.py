"""Ingest: turning a user's photo sources into checked, hashed records (the collect stage).

Owns the input records of every source kind (`records`: folders and the record reader;
`archives`: tar and zip; `catalogs`: CSV/JSONL rows), the per-image ingest on Dask (`sources`)
and its per-photo cache (`facts_cache`, over `photo_cache`, which dedupe's features use too),
the catalog downloader (`download` and its `download_*` parts) and the perceptual hash
(`hashing`). Every input record comes out accepted or quarantined with a reason.
"""
