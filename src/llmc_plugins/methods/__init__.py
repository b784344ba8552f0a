"""Built-in compression methods."""
