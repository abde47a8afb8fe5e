"""Deletes for S3 backends, written once: S3 answers DELETE with 204 whether or not the object was there.

So telling a caller whether an object existed costs a HEAD first (``adelete_many``), and
``adiscard_many`` sends none when the caller does not ask. A backend (an ``AsyncBackend``, whose
blocking methods mirror these coroutines) supplies two wire operations as coroutines:
``_present(names)`` (HEADs, many in flight) and ``_send_delete(names)`` (DeleteObject for one
name, DeleteObjects in batches of 1000 for more).
"""

from __future__ import annotations

import abc

from kvstore.backends import call


class HeadThenDelete(abc.ABC):
    @abc.abstractmethod
    async def _present(self, names: list[str]) -> list[bool]:
        """Whether each object exists (HEADs)."""

    @abc.abstractmethod
    async def _send_delete(self, names: list[str]) -> None:
        """Delete the objects, whether they exist or not; an object the service could not delete raises."""

    async def adelete_many(self, names: list[str]) -> list[bool]:
        if not names:
            return []
        found = await self._present(names)
        existed = call.existed(names, found)  # what an earlier attempt of this call saw still counts
        doomed = [n for n, there in zip(names, found) if there]
        if doomed:
            await self._send_delete(doomed)
        return existed

    async def adiscard_many(self, names: list[str]) -> None:
        if names:
            await self._send_delete(names)
