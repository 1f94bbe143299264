"""fedmart: privacy."""
