"""The user-facing classes (OpenDelta-compatible names)."""
