"""Bytes on disk: the delta checkpoint format (atomic safetensors), PEFT interchange, and loading a
transformers checkpoint into a backbone built on ``meta`` or sharded by an engine."""
