"""Model importers. Each turns a file format into a kiln `Graph`."""
