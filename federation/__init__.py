"""fedmart: federation."""
