"""App layer: the embedded demo model and the small trainer that made it."""
