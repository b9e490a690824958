"""The background service: sync, policy checks, the sweep, delivery, the record."""
