"""hvtools.migration."""
