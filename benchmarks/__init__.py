"""deltadist's benchmarks: ``python -m benchmarks run [--quick] [--only NAME ...] [--check]``."""
