"""hvtools.transport."""
