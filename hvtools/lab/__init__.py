"""hvtools.lab."""
