"""Batch LLM jobs: one task per (chunk x framework x model x run) through the model gateway,
crash-safe and resumable, with reliability statistics and a replication package."""
