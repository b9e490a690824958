"""(filled in by its owner; see app.py)"""

from __future__ import annotations

from flask import Blueprint

blueprint = Blueprint("board", __name__)
