"""The bottom layer: atomic writes and hashing (``io``), the one artifact contract (``artifacts``), the one result
cache (``cache``), where things live on disk (``paths``) and the error every bad input raises (``errors``).
Imports nothing of crvlm above it."""
