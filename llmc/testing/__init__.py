"""Test helpers: tiny, offline-built real checkpoints (see ``llmc.testing.tiny_models``)."""
