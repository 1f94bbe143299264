"""fedmart: clients."""
