"""Named, supervised background tasks (docs/architecture.md, "Rules that hold everywhere").

Every long-running loop of the process (listener, dispatcher, refresher, log writer...) is
started through ``Supervisor.spawn``. A task that dies with an exception — or returns while
the process is not stopping, which is the same bug in disguise — is logged with its
traceback and sets ``stopping`` with ``failed`` True: ``crm-bridge run`` then shuts down
and exits non-zero, so systemd's ``Restart=on-failure`` brings it back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import structlog

log = structlog.get_logger(__name__)


class Supervisor:
    """Owns the process's background tasks and the one "stop now" event."""

    def __init__(self) -> None:
        self.stopping = asyncio.Event()
        self.failed: str | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Start ``coro`` as the task ``name`` (unique) and watch how it ends."""
        if name in self._tasks:
            coro.close()
            raise ValueError(f"a task named {name!r} is already running")
        task = asyncio.create_task(coro, name=name)
        self._tasks[name] = task
        task.add_done_callback(self._on_done)
        return task

    def _on_done(self, task: asyncio.Task[None]) -> None:
        name = task.get_name()
        self._tasks.pop(name, None)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("task_crashed", task=name, exc_info=exc)
            self.fail(f"task {name} crashed: {type(exc).__name__}")
        elif not self.stopping.is_set():
            log.error("task_exited", task=name)
            self.fail(f"task {name} exited unexpectedly")

    def fail(self, reason: str) -> None:
        """Stop the process with a failure (the first reason is kept)."""
        if self.failed is None:
            self.failed = reason
        self.stopping.set()

    def stop(self) -> None:
        """Ask every loop to finish (a graceful stop: exit code 0)."""
        self.stopping.set()

    @property
    def names(self) -> list[str]:
        """The names of the tasks still running."""
        return sorted(self._tasks)

    async def cancel_all(self, timeout_s: float = 5.0) -> None:
        """Cancel what is still running and wait (bounded) for it to unwind."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)

    async def join(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every task to finish on its own; True when all did."""
        tasks = list(self._tasks.values())
        if not tasks:
            return True
        _done, still = await asyncio.wait(tasks, timeout=timeout_s)
        return not still
