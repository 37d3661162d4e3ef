"""App layer: the `grape` command line, a table of commands over the Python API."""
