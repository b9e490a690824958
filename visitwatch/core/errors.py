"""The project-wide errors. Every error visitwatch raises on purpose derives from these."""

from __future__ import annotations


class VisitwatchError(Exception):
    """Base of every error visitwatch raises on purpose.

    Its message is written for the person who can fix the problem: what is wrong,
    where (file, key, event uid) and how to fix it. The CLI shows it without a traceback.
    """


class ConnectorError(VisitwatchError):
    """A source or channel failed. ``permanent`` says whether retrying can help.

    ``recipient_fault`` says the failure is about one recipient (an invalid number, a
    person who opted out), not the channel: the channel stays healthy and the admins hear
    about that person, not about an outage.
    """

    def __init__(
        self, message: str, *, permanent: bool = False, recipient_fault: bool = False
    ) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.recipient_fault = recipient_fault
