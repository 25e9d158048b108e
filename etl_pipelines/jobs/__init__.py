"""Jobs of the code location."""
