"""BullMQ (Node; the v5 and v6 layouts): every queue's keys are ``<key_prefix>:<queue>:<suffix>``.

BullMQ keeps no registry of queue names, so the queues are the target's ``queues:`` (or, opt-in, found by
a bounded SCAN). A poll is three pipelined round trips of plain read commands (plus more pages of the
events stream when a poll has to catch up), whatever the number of waiting or retained jobs:

1. ``TIME``; per queue: ``LLEN wait``/``paused``/``active``; ``ZCARD prioritized``/``delayed``/``failed``;
   ``LINDEX wait -1`` (the next job); ``HEXISTS meta paused``; ``LRANGE active`` up to a budget;
   ``EXISTS events``.
2. Per queue: the due part of ``delayed`` (``ZCOUNT``) and its oldest member; the ids of the delayed jobs
   while they fit in the split budget; ``HGET <next> timestamp``; per active job ``EXISTS <id>:lock`` and
   ``HGET <id> processedOn``; ``XINFO STREAM events`` and ``XRANGE events`` after the cursor.
3. Per delayed job within the budget: ``HGET <id> atm`` (retry or scheduled).

States: pending = ``wait`` + ``paused`` (BullMQ 5 moves waiting jobs there while paused; 6 keeps them in
``wait``) + ``prioritized`` + the due part of ``delayed`` (due jobs are promoted only in a worker's claim
path); retrying = delayed jobs that already made an attempt (``atm`` > 0), scheduled = the others (while
``DELAYED_SPLIT_BUDGET`` delayed jobs of the whole target are read per poll, queue by queue; a queue
whose delayed jobs no longer fit counts them all as scheduled); running = ``active``; dead =
``failed`` (it holds only final failures; retained jobs only, so with ``count_terminal_states``). Oldest
pending age from the next job's ``timestamp`` (ms), or the oldest due time in ``delayed`` (score / 4096 ms);
a promoted delayed job keeps its creation time, so its age is overstated. Oldest running age from
``processedOn`` of the active jobs. Stale: an active job whose ``<id>:lock`` is gone (its worker died);
BullMQ's stall check in a live worker moves it back to ``wait`` later.

Finished counting exactly once from the ``events`` stream, the last entry id read as the watermark:
``completed`` -> succeeded; ``failed`` -> dead (BullMQ emits it only for a final failure); ``delayed`` that
does not directly follow the job's own ``added`` -> retried (a failed attempt waiting out its backoff);
``waiting`` with ``prev: active`` that is not followed by ``stalled`` -> retried (retried without backoff).
The stream is trimmed to about ``opts.maxLenEvents`` (10,000 by default): when more events were added
since the last poll than could still be read (``XINFO STREAM`` ``entries-added``), the missing ones are
counted as lost and logged, never guessed.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from ... import Finished, LiveRow, Outcome, Reading, StaleJob, TerminalRow
from . import KIND, Memory

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from ....config import Target

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "bull"
ACTIVE_BUDGET = 10_000
# delayed jobs (of the whole target, per poll) whose attempt count is read to tell retries from
# scheduled jobs
DELAYED_SPLIT_BUDGET = 1_000
# queue discovery (opt-in): SCAN calls per discovery, and how often one runs
SCAN_COUNT = 1_000
SCAN_CALLS = 50
DISCOVERY_INTERVAL = 60.0
EVENTS_PAGE = 1_000
EVENTS_PAGES = 20  # at most this many pages per poll; the rest is read at the next poll
DELAY_SCALE = 4096  # delayed scores are due-time ms x 4096 + a sequence number


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(entry: tuple[Any, Any]) -> tuple[str, dict[str, str]]:
    entry_id, raw = entry
    return _text(entry_id), {_text(k): _text(v) for k, v in raw.items()}


def _after(entry_id: str) -> str:
    """The smallest stream id after ``entry_id`` (XRANGE's exclusive start, spelled for Redis < 6.2)."""
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


class BullMQPreset:
    name = "bullmq"
    description = "BullMQ (Node) 5 and 6"
    outcomes: tuple[Outcome, ...] = ("succeeded", "dead", "retried")
    default_stale_after = 0.0  # a missing lock is the stale rule: its worker stopped renewing it
    builtin_rescue_after: float | None = 30.0
    self_rescue = (
        "every BullMQ worker's stall check moves active jobs whose lock expired back to wait (or to "
        "failed past maxStalledCount), every stalledInterval (30 s)"
    )
    acl_commands: tuple[str, ...] = (
        "ping", "time", "select", "client|setname", "llen", "lindex", "lrange", "zcard", "zcount",
        "zrangebyscore", "hexists", "hget", "exists", "xrange", "xinfo|stream",
        "scan",  # only with discover_queues: true
    )  # fmt: skip
    acl_keys: tuple[str, ...] = (f"{DEFAULT_PREFIX}:*",)

    def acl_keys_for(self, target: Target) -> tuple[str, ...]:
        return (f"{target.key_prefix or DEFAULT_PREFIX}:*",)

    async def _discover(self, client: Redis, prefix: str, memory: Memory) -> set[str]:
        """Queue names from ``<prefix>:<queue>:meta`` keys: at most SCAN_CALLS calls of SCAN_COUNT
        keys per DISCOVERY_INTERVAL, resuming at the stored cursor, so a large keyspace is covered
        over several discoveries instead of one long one. Found queues are kept (their series
        expire by label_ttl when they empty out and disappear)."""
        found: set[str] = memory.values.setdefault("discovered", set())
        now = time.monotonic()
        if now < memory.values.get("next_discovery", 0.0):
            return found
        memory.values["next_discovery"] = now + DISCOVERY_INTERVAL
        cursor = memory.values.get("scan_cursor", 0)
        pattern = f"{prefix}:*:meta"
        for _ in range(SCAN_CALLS):
            cursor, keys = await client.scan(cursor=cursor, match=pattern, count=SCAN_COUNT)
            for raw in keys:
                name = _text(raw)[len(prefix) + 1 : -len(":meta")]
                if name and ":" not in name:
                    found.add(name)
            if cursor == 0:
                break
        memory.values["scan_cursor"] = cursor
        return found

    async def read(
        self,
        client: Redis,
        target: Target,
        stale_after: float,
        want_stale: bool,
        memory: Memory,
    ) -> Reading:
        prefix = target.key_prefix or DEFAULT_PREFIX
        queues = list(target.queues or ())
        if target.discover_queues:
            queues = sorted(set(queues) | await self._discover(client, prefix, memory))

        def key(queue: str, suffix: str) -> str:
            return f"{prefix}:{queue}:{suffix}"

        first = client.pipeline(transaction=False)
        first.time()
        for q in queues:
            first.llen(key(q, "wait"))
            first.llen(key(q, "paused"))
            first.llen(key(q, "active"))
            first.zcard(key(q, "prioritized"))
            first.zcard(key(q, "delayed"))
            first.zcard(key(q, "failed"))
            first.lindex(key(q, "wait"), -1)
            first.hexists(key(q, "meta"), "paused")
            first.lrange(key(q, "active"), 0, ACTIVE_BUDGET - 1)
            first.exists(key(q, "events"))
        results = await first.execute()
        seconds, micros = results[0]
        now = seconds + micros / 1e6
        due = (int(now * 1000) + 1) * DELAY_SCALE - 1
        per_queue = 10
        rows = {
            q: results[1 + i * per_queue : 1 + (i + 1) * per_queue] for i, q in enumerate(queues)
        }

        second = client.pipeline(transaction=False)
        budget = DELAYED_SPLIT_BUDGET
        splits: dict[str, bool] = {}
        for q in queues:
            delayed, head, active_ids, has_events = rows[q][4], rows[q][6], rows[q][8], rows[q][9]
            second.zcount(key(q, "delayed"), 0, due)
            second.zrangebyscore(key(q, "delayed"), 0, due, start=0, num=1, withscores=True)
            # the ids of the delayed jobs, only while every one of them fits in the budget
            splits[q] = 0 < delayed <= budget
            if splits[q]:
                budget -= delayed
                second.zrangebyscore(key(q, "delayed"), due + 1, "+inf", start=0, num=delayed)
            if head is not None:
                second.hget(key(q, _text(head)), "timestamp")
            for job_id in active_ids:
                second.exists(key(q, f"{_text(job_id)}:lock"))
                second.hget(key(q, _text(job_id)), "processedOn")
            if has_events:
                second.xinfo_stream(key(q, "events"))
                cursor = memory.values.get(("cursor", q))
                if cursor is not None:
                    second.xrange(key(q, "events"), _after(cursor), "+", count=EVENTS_PAGE)
        answers = iter(await second.execute())

        live: list[LiveRow] = []
        terminal: list[TerminalRow] = []
        stale_jobs: list[StaleJob] = []
        paused: dict[str, bool] = {}
        finished: list[Finished] = []
        lost: dict[str, int] = {}
        split_pending: list[tuple[str, list[bytes]]] = []
        for q in queues:
            (
                wait,
                legacy_paused,
                active,
                prioritized,
                delayed,
                failed,
                head,
                is_paused,
                active_ids,
                has_events,
            ) = rows[q]
            due_count = next(answers)
            oldest_due = next(answers)
            not_due_ids = next(answers) if splits[q] else None
            oldest = None
            if head is not None:
                created = next(answers)
                if created is not None:
                    oldest = now - int(created) / 1000
            if oldest_due:
                age = now - (int(oldest_due[0][1]) // DELAY_SCALE) / 1000
                oldest = age if oldest is None else max(oldest, age)
            stale, started = 0, []
            for job_id in active_ids:
                has_lock, processed_on = next(answers), next(answers)
                if processed_on is not None:
                    started.append(int(processed_on) / 1000)
                if not has_lock:
                    stale += 1
                    if want_stale:
                        stale_jobs.append(StaleJob(_text(job_id), q, KIND, f"{processed_on}"))
            if has_events:
                info = next(answers)
                events = next(answers) if ("cursor", q) in memory.values else []
                finished += await self._finished(
                    client, key(q, "events"), q, info, events, memory, lost
                )
            not_due = delayed - due_count
            if not_due_ids is not None:
                split_pending.append((q, not_due_ids))
            live += self._waiting(q, wait + legacy_paused + prioritized + due_count, oldest)
            live.append(LiveRow(q, KIND, "scheduled", not_due, None, 0))  # split below
            if active:
                running_age = now - min(started) if started else None
                live.append(LiveRow(q, KIND, "running", active, running_age, stale))
            if target.count_terminal_states and failed:
                terminal.append(TerminalRow(q, KIND, "dead", failed))
            paused[q] = bool(is_paused)
        live = await self._split_delayed(client, key, live, split_pending)
        if lost:
            memory.values["lost"] = Counter(memory.values.get("lost", Counter())) + Counter(lost)
        return Reading(
            live=[row for row in live if row.jobs > 0],
            terminal=terminal if target.count_terminal_states else None,
            finished=finished,
            stale=stale_jobs if want_stale else None,
            paused=paused,
            lost_events=lost,
        )

    @staticmethod
    def _waiting(queue: str, pending: int, oldest: float | None) -> list[LiveRow]:
        return [LiveRow(queue, KIND, "pending", pending, oldest, 0)]

    @staticmethod
    async def _split_delayed(
        client: Redis, key: Any, live: list[LiveRow], split: list[tuple[str, list[bytes]]]
    ) -> list[LiveRow]:
        """Delayed jobs that made an attempt are retries: one HGET each, within the budget."""
        if not split:
            return live
        pipe = client.pipeline(transaction=False)
        for q, ids in split:
            for job_id in ids:
                pipe.hget(key(q, _text(job_id)), "atm")
        attempts = iter(await pipe.execute())
        retrying: dict[str, int] = {}
        for q, ids in split:
            retrying[q] = sum(1 for _ in ids if int(next(attempts) or 0) > 0)
        out = []
        for row in live:
            if row.state == "scheduled" and row.queue in retrying:
                retries = retrying[row.queue]
                out.append(LiveRow(row.queue, KIND, "scheduled", row.jobs - retries, None, 0))
                out.append(LiveRow(row.queue, KIND, "retrying", retries, None, 0))
            else:
                out.append(row)
        return out

    async def _finished(
        self,
        client: Redis,
        stream: str,
        queue: str,
        info: dict[Any, Any],
        page: list[Any],
        memory: Memory,
        lost: dict[str, int],
    ) -> list[Finished]:
        """Count the events after the cursor, page by page; the first poll only sets the cursor."""
        info = {_text(k): v for k, v in info.items()}
        last_id = _text(info.get("last-generated-id", "0-0"))
        added = int(info.get("entries-added", 0) or 0)
        cursor_key, added_key, held_key = ("cursor", queue), ("added", queue), ("held", queue)
        if cursor_key not in memory.values:
            memory.values[cursor_key] = last_id
            memory.values[added_key] = added
            return []
        entries = [_fields(entry) for entry in page]
        pages = 1
        while len(page) == EVENTS_PAGE and pages < EVENTS_PAGES:
            page = list(
                await client.xrange(stream, _after(entries[-1][0]), "+", count=EVENTS_PAGE) or []
            )
            entries += [_fields(entry) for entry in page]
            pages += 1
        caught_up = len(page) < EVENTS_PAGE
        held: tuple[str, dict[str, str]] | None = memory.values.get(held_key)
        previous = memory.values.get(("previous", queue))
        if held is not None:
            entries.insert(0, held)
        read = len(entries) - (held is not None)
        if caught_up and added:
            missing = added - memory.values.get(added_key, added) - read
            if missing > 0:
                lost[queue] = missing
                log.warning(
                    "queue %s: %d events were trimmed from %s before they were read (the stream keeps "
                    "about opts.maxLenEvents); finished jobs among them are not counted",
                    queue,
                    missing,
                    stream,
                )
            memory.values[added_key] = added
        counts: Counter[str] = Counter()
        memory.values[held_key] = None
        for i, (entry_id, fields) in enumerate(entries):
            event, job = fields.get("event"), fields.get("jobId")
            if event == "completed":
                counts["succeeded"] += 1
            elif event == "failed" and job is not None:
                counts["dead"] += 1
            elif event == "delayed":
                # a job added with a delay emits `added` then `delayed` in one script
                before = entries[i - 1][1] if i > 0 else previous
                if not (before and before.get("event") == "added" and before.get("jobId") == job):
                    counts["retried"] += 1
            elif event == "waiting" and fields.get("prev") == "active":
                if i + 1 == len(entries):
                    memory.values[held_key] = (entry_id, fields)  # is a `stalled` next? next poll
                    continue
                after = entries[i + 1][1]
                if not (after.get("event") == "stalled" and after.get("jobId") == job):
                    counts["retried"] += 1
            memory.values[("previous", queue)] = fields
        if entries:
            memory.values[cursor_key] = entries[-1][0]
        at = time.time()
        return [
            Finished(queue, KIND, outcome, jobs, at)  # type: ignore[arg-type]
            for outcome, jobs in counts.items()
            if jobs
        ]


PRESET = BullMQPreset()
