"""The shared core: errors, calendar and notification types, the option system.

``policies``, ``connectors`` and ``daemon`` all import from here; it imports none of
them. Nothing in the core does I/O beyond reading a secret file.
"""
