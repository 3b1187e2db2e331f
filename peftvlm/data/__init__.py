"""Data: sources, templates, self-instruct generation, collation."""
