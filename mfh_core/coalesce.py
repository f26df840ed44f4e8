"""Concurrent calls in one round trip: what the hot store does for staging (the batch queue does it for enqueueing).

A call that finds fewer than ``max_in_flight`` round trips pending goes out at once (with whatever
else the same event-loop iteration submitted), so a quiet caller waits for nothing; calls made
while round trips are pending collect and go out together when one returns. Each caller gets its
own result or its own error: ``run`` answers per item, and only a failure of the round trip itself
(Redis unreachable, a timeout) fails every item that travelled in it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["Coalescer"]

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    """Submits items to ``run`` in lists; ``run`` returns one result or exception per item, in order."""

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
        *,
        weight: Callable[[T], int] = lambda _: 1,
        max_weight: int = 512,
        max_in_flight: int = 2,
    ) -> None:
        self._run = run
        self._weight = weight
        self.max_weight = max_weight
        self.max_in_flight = max_in_flight
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._in_flight = 0
        self._soon: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.round_trips = 0

    async def submit(self, item: T) -> R:
        """The result of ``item``'s run; raises its own exception, or the round trip's."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        self._pending.append((item, fut))
        if self._in_flight < self.max_in_flight and self._soon is None:
            self._soon = loop.call_soon(self._go)
        return await fut

    def _go(self) -> None:
        self._soon = None
        while self._pending and self._in_flight < self.max_in_flight:
            take, total = 0, 0
            for item, _ in self._pending:
                total += self._weight(item)
                take += 1
                if total >= self.max_weight:
                    break
            batch, self._pending = self._pending[:take], self._pending[take:]
            self._in_flight += 1
            task = asyncio.ensure_future(self._call(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _call(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._run([item for item, _ in batch])
        except Exception as e:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(e)
        except BaseException:
            for _, fut in batch:
                fut.cancel()
            raise
        else:
            for (_, fut), r in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if isinstance(r, BaseException):
                    fut.set_exception(r)
                else:
                    fut.set_result(r)
        finally:
            self.round_trips += 1
            self._in_flight -= 1
            if self._pending:
                self._go()
