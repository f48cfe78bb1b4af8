"""Name-based addressing: patterns, canonical names, common structure maps."""
