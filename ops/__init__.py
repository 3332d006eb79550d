"""Lightning-free math, one file per method: pure functions with unit tests."""
