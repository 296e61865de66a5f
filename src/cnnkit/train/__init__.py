"""See the README map."""
