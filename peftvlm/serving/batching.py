"""Dynamic batching of concurrent requests in front of one model.

Requests wait in an asyncio queue; one worker takes the first, gathers whatever else arrives
within `wait_s` (and everything already queued, while the previous batch ran) up to
`max_batch_size`, groups them by key (generation options and base/fine-tuned: only requests
that generate alike share a `generate` call), and runs each group in a thread so the event loop
keeps accepting requests. Hand-written because the pattern is ~40 lines and the libraries that
offer it (vLLM, TGI, `transformers serve --continuous-batching`) serve plain checkpoints, not
peft adapters, prompts or our family templates.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Callable, Hashable


@dataclass
class Job:
    key: Hashable
    item: Any
    future: asyncio.Future


@dataclass
class BatchStats:
    requests: int = 0
    batches: int = 0
    max_batch_size: int = 0

    def as_dict(self) -> dict:
        return {"requests": self.requests, "batches": self.batches,
                "max_batch_size": self.max_batch_size}


class Batcher:
    """`await batcher.submit(key, item)` -> the result of `run(key, [items])` for that item."""

    def __init__(self, run: Callable[[Hashable, list], list], max_batch_size: int = 8,
                 wait_s: float = 0.01):
        self.run, self.max_batch_size, self.wait_s = run, max_batch_size, wait_s
        self.queue: asyncio.Queue[Job] | None = None
        self.stats = BatchStats()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def submit(self, key: Hashable, item) -> Any:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(Job(key, item, future))
        return await future

    async def _gather(self) -> list[Job]:
        jobs = [await self.queue.get()]
        deadline = asyncio.get_running_loop().time() + self.wait_s
        while len(jobs) < self.max_batch_size:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                jobs.append(self.queue.get_nowait() if remaining <= 0 else
                            await asyncio.wait_for(self.queue.get(), remaining))
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
        return jobs

    async def _work(self) -> None:
        while True:
            jobs = await self._gather()
            groups: dict[Hashable, list[Job]] = {}
            for job in jobs:
                groups.setdefault(job.key, []).append(job)
            for key, group in groups.items():
                await self._run_group(key, group)

    async def _run_group(self, key, group: list[Job]) -> None:
        self.stats.requests += len(group)
        self.stats.batches += 1
        self.stats.max_batch_size = max(self.stats.max_batch_size, len(group))
        try:
            results = await asyncio.to_thread(self.run, key, [j.item for j in group])
        except Exception as exc:  # noqa: BLE001 - each waiting request gets the error
            for job in group:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        for job, result in zip(group, results):
            if not job.future.done():  # a client that disconnected cancelled its future
                job.future.set_result(result)
