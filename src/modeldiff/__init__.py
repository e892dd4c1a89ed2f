"""modeldiff."""
