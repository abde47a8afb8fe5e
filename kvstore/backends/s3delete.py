"""Deletes for S3 backends, written once: S3 answers DELETE with 204 whether or not the object was there.

So telling a caller whether an object existed costs a HEAD first (``delete``, ``delete_many``),
and ``discard_many`` sends none when the caller does not ask. A backend supplies two wire
operations: ``_present(names)`` (HEADs, many in flight) and ``_send_delete(names)`` (DeleteObject
for one name, DeleteObjects in batches of 1000 for more).
"""

from __future__ import annotations

import abc

from kvstore.backends import call


class HeadThenDelete(abc.ABC):
    @abc.abstractmethod
    def _present(self, names: list[str]) -> list[bool]:
        """Whether each object exists (HEADs)."""

    @abc.abstractmethod
    def _send_delete(self, names: list[str]) -> None:
        """Delete the objects, whether they exist or not; an object the service could not delete raises."""

    def delete(self, name: str) -> bool:
        return self.delete_many([name])[0]

    def delete_many(self, names: list[str]) -> list[bool]:
        if not names:
            return []
        found = self._present(names)
        existed = call.existed(names, found)  # what an earlier attempt of this call saw still counts
        doomed = [n for n, there in zip(names, found) if there]
        if doomed:
            self._send_delete(doomed)
        return existed

    def discard_many(self, names: list[str]) -> None:
        if names:
            self._send_delete(names)
