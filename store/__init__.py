"""Persistence: compressed caches as safetensors blobs, indexed in SQL (SQLite by default)."""
