"""visitwatch: watches home visits and escalates overruns until someone acknowledges.

``core`` holds what every part shares; ``daemon``, ``connectors`` and ``policies`` are the
project's top-level folders, linked in here so that one package tree serves Python,
installers and static tools alike. ``daemon`` depends on the other two; nothing depends
on ``daemon``.
"""

__version__ = "0.1.0"
