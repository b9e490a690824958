"""The contracts every source and every channel must keep, as test classes to subclass.

A new connector's test module subclasses one of these and provides the fixture it asks
for; every test in the contract then runs against the new connector. See CONTRIBUTING.md.
"""

from tests.channel_contract import ChannelContract
from tests.source_contract import CalendarSourceContract

__all__ = ["CalendarSourceContract", "ChannelContract"]
