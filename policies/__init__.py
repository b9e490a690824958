"""What the organisation requires: visit recognition, field extraction, rules, presets."""

from visitwatch.policies.policy import Policy
from visitwatch.policies.settings import known_presets, load_preset, parse_policy

__all__ = ["Policy", "known_presets", "load_preset", "parse_policy"]
