"""Transfer methods."""
