"""asynq (Go, v0.24-v0.26 key layout): every queue's keys start ``asynq:{<queue>}:``.

Read per poll, in three pipelined round trips of plain read commands, whatever the number of jobs:

1. ``TIME``, ``SMEMBERS asynq:queues`` (queue names; declared ``queues:`` are read even before asynq
   knows them, at 0).
2. Per queue: ``LLEN pending``/``active``; ``ZCARD`` and ``ZCOUNT -inf now`` of ``scheduled`` and
   ``retry`` (due ones are pending: asynq's forwarder moves them only while a server runs); ``ZCARD
   archived``; ``ZRANGEBYSCORE ... LIMIT 0 1`` of the due part of both sets (the oldest due time);
   ``LINDEX pending -1`` (the next task, the longest waiting); ``EXISTS paused``; ``MGET processed
   failed``; ``ZCOUNT archived`` of the seconds since the last poll; ``LRANGE active`` up to a budget.
3. Per queue: ``HGET t:<head> pending_since`` and ``ZMSCORE lease <active ids>``.

States: pending = the ``pending`` list plus the due part of ``scheduled`` and ``retry``; scheduled and
retrying = the rest of those sets; running = ``active``; dead = ``archived`` (asynq caps it at 10,000 and
90 days; a ZCARD, so always exported). Oldest pending age as asynq measures latency (``pending_since``,
nanoseconds, of the next task), or the oldest due time of a task not forwarded yet. Stale: an active task
whose lease expired more than ``stale_after`` ago (asynq's own margin is 30 s), or that has no lease at
all (asynq's recoverer never sees those).

Finished counting from asynq's own running totals, which count attempts: a success adds 1 to
``processed``; a failed attempt adds 1 to ``processed`` and to ``failed``, whether it is retried or
archived. So per poll: succeeded = Δprocessed − Δfailed; dead = tasks archived in the seconds since the
last poll (``ZCOUNT archived``; scores are whole seconds, so the last second is left for the next poll);
retried = Δfailed − dead. Oldest running age from the live servers' worker records (``asynq:workers``,
one ``HVALS`` per server: the start time of each task it runs). A counter that went down was reset (asynq wraps at MaxInt64): its new value is
the increase. The first poll is the baseline.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from ... import Finished, LiveRow, Outcome, Reading, StaleJob, TerminalRow
from . import KIND, Memory

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from ....config import Target

# active task ids read per queue (asynq runs at most as many as its servers' concurrency)
ACTIVE_BUDGET = 10_000
# live asynq servers whose worker records are read (one HVALS each)
SERVER_BUDGET = 1_000
LEASE_MARGIN = 30.0


def _key(queue: str, name: str) -> str:
    return f"asynq:{{{queue}}}:{name}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(value: Any) -> int:
    return int(value) if value is not None else 0


def _protobuf(data: bytes) -> dict[int, list[int | bytes]]:
    """The top-level fields of a protobuf message: varints as ints, length-delimited as bytes (the
    few fields of asynq's WorkerInfo this reads need no generated code)."""
    fields: dict[int, list[int | bytes]] = {}
    i = 0

    def varint() -> int:
        nonlocal i
        shift = result = 0
        while True:
            byte = data[i]
            i += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7

    while i < len(data):
        tag = varint()
        number, wire = tag >> 3, tag & 7
        value: int | bytes
        if wire == 0:
            value = varint()
        elif wire == 2:
            size = varint()
            value, i = data[i : i + size], i + size
        elif wire == 1:
            value, i = int.from_bytes(data[i : i + 8], "little"), i + 8
        elif wire == 5:
            value, i = int.from_bytes(data[i : i + 4], "little"), i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def _oldest_starts(records: list[list[bytes]]) -> dict[str, float]:
    """Queue -> the earliest start (Unix time) of a task a live server is running, from the servers'
    WorkerInfo records (queue = field 7, start_time = field 8, a Timestamp of seconds and nanos)."""
    oldest: dict[str, float] = {}
    for values in records:
        for raw in values or ():
            try:
                info = _protobuf(raw)
                queue = bytes(info[7][0]).decode()
                stamp = _protobuf(bytes(info[8][0]))
                start = int(stamp.get(1, [0])[0]) + int(stamp.get(2, [0])[0]) / 1e9
            except (KeyError, IndexError, ValueError, UnicodeDecodeError):
                continue  # a record of another version: no age rather than a wrong one
            oldest[queue] = min(start, oldest.get(queue, start))
    return oldest


class AsynqPreset:
    # the read-only ACL the exporter needs (README: Redis; the tests run as exactly this user)
    acl_commands: tuple[str, ...] = (
        "ping", "time", "select", "client|setname", "smembers", "llen", "lindex", "lrange",
        "zcard", "zcount", "zrangebyscore", "zmscore", "exists", "mget", "hget", "hvals",
    )  # fmt: skip
    acl_keys: tuple[str, ...] = ("asynq:*",)
    name = "asynq"
    description = "asynq (Go) v0.24-v0.26"
    outcomes: tuple[Outcome, ...] = ("succeeded", "dead", "retried")
    default_stale_after = LEASE_MARGIN
    builtin_rescue_after: float | None = 60.0 + LEASE_MARGIN
    self_rescue = (
        "every asynq server's recoverer moves tasks whose lease expired over 30 s ago to retry or "
        "archived, every minute (not tasks without a lease)"
    )

    def acl_keys_for(self, target: Target) -> tuple[str, ...]:
        return self.acl_keys

    async def read(
        self,
        client: Redis,
        target: Target,
        stale_after: float,
        want_stale: bool,
        memory: Memory,
    ) -> Reading:
        first = client.pipeline(transaction=False)
        first.time()
        first.smembers("asynq:queues")
        # the live servers' worker records (a server rewrites its own every 5 s, with a 10 s expiry)
        first.zrangebyscore("asynq:workers", int(time.time()), "+inf", start=0, num=SERVER_BUDGET)
        (seconds, micros), known, worker_keys = await first.execute()
        now = seconds + micros / 1e6
        queues = sorted({_text(q) for q in known} | set(target.queues or ()))

        second = client.pipeline(transaction=False)
        settled = (
            int(now) - 1
        )  # archive scores are whole seconds: count each second once it is over
        since = memory.values.get("archived_until", settled)
        for q in queues:
            second.llen(_key(q, "pending"))
            second.llen(_key(q, "active"))
            for name in ("scheduled", "retry"):
                second.zcard(_key(q, name))
                second.zcount(_key(q, name), "-inf", now)
                second.zrangebyscore(_key(q, name), "-inf", now, start=0, num=1, withscores=True)
            # the totals before the archived tail: an archive counted in `failed` but not yet settled
            # is then always in the tail (asynq's scripts update both at once)
            second.mget(_key(q, "processed"), _key(q, "failed"))
            second.zcard(_key(q, "archived"))
            second.zcount(_key(q, "archived"), f"({since}", settled)
            second.zcount(_key(q, "archived"), f"({settled}", "+inf")
            second.lindex(_key(q, "pending"), -1)
            second.exists(_key(q, "paused"))
            second.lrange(_key(q, "active"), 0, ACTIVE_BUDGET - 1)
        results = await second.execute()
        per_queue = 15
        rows = {q: results[i * per_queue : (i + 1) * per_queue] for i, q in enumerate(queues)}

        third = client.pipeline(transaction=False)
        for worker_key in worker_keys:
            third.hvals(worker_key)
        for q in queues:
            head, active_ids = rows[q][12], rows[q][14]
            if head is not None:
                third.hget(_key(q, f"t:{_text(head)}"), "pending_since")
            if active_ids:
                third.zmscore(_key(q, "lease"), active_ids)
        extra = iter(await third.execute()) if len(third) else iter(())
        started = _oldest_starts([next(extra) for _ in worker_keys])

        live: list[LiveRow] = []
        terminal: list[TerminalRow] = []
        stale_jobs: list[StaleJob] = []
        paused: dict[str, bool] = {}
        counts: Counter[tuple[str, str]] = Counter()
        totals: dict[str, tuple[int, int]] = {}
        for q in queues:
            (
                pending,
                active,
                scheduled,
                scheduled_due,
                scheduled_oldest,
                retry,
                retry_due,
                retry_oldest,
                (processed, failed),
                archived,
                archived_new,
                archived_unsettled,
                head,
                is_paused,
                active_ids,
            ) = rows[q]
            oldest = None
            if head is not None:
                since_ns = next(extra)
                if since_ns is not None:
                    oldest = now - int(since_ns) / 1e9
            for due in (scheduled_oldest, retry_oldest):
                if due:
                    age = now - float(due[0][1])
                    oldest = age if oldest is None else max(oldest, age)
            stale = 0
            if active_ids:
                leases = next(extra)
                for task_id, lease in zip(active_ids, leases, strict=True):
                    # no lease at all, or a lease that ran out more than stale_after ago
                    if lease is None or float(lease) < now - stale_after:
                        stale += 1
                        if want_stale:
                            stale_jobs.append(StaleJob(_text(task_id), q, KIND, f"lease:{lease}"))
            waiting = {
                "pending": pending + scheduled_due + retry_due,
                "scheduled": scheduled - scheduled_due,
                "retrying": retry - retry_due,
            }
            for state, jobs in waiting.items():
                if jobs > 0:
                    age = oldest if state == "pending" else None
                    live.append(LiveRow(q, KIND, state, jobs, age, 0))  # type: ignore[arg-type]
            if active > 0:
                running_age = now - started[q] if q in started else None
                live.append(LiveRow(q, KIND, "running", active, running_age, stale))
            if archived > 0:
                terminal.append(TerminalRow(q, KIND, "dead", archived))
            paused[q] = bool(is_paused)
            totals[q] = (_int(processed), _int(failed))
            counts[(q, "dead")] += archived_new
            counts[(q, "unsettled")] += archived_unsettled
        memory.values["archived_until"] = settled
        finished = self._finished(memory, totals, counts, time.time())
        return Reading(
            live=live,
            terminal=terminal,
            finished=finished,
            stale=stale_jobs if want_stale else None,
            paused=paused,
        )

    @staticmethod
    def _finished(
        memory: Memory,
        totals: dict[str, tuple[int, int]],
        archived: Counter[tuple[str, str]],
        at: float,
    ) -> list[Finished]:
        previous: dict[str, tuple[int, int]] | None = memory.values.get("totals")
        carry: Counter[str] = memory.values.setdefault("carry", Counter())
        unsettled_before: dict[str, int] = memory.values.get("unsettled", {})
        memory.values["totals"] = dict(totals)
        memory.values["unsettled"] = {q: archived[(q, "unsettled")] for q in totals}
        if previous is None:
            return []  # the baseline: what happened before the exporter started is not counted
        finished = []
        for q, (processed, failed) in totals.items():
            before_processed, before_failed = previous.get(q, (0, 0))
            # a total that went down was reset (asynq wraps at MaxInt64): the new value is the rise
            d_processed = (
                processed - before_processed if processed >= before_processed else processed
            )
            d_failed = failed - before_failed if failed >= before_failed else failed
            dead = archived[(q, "dead")]
            # dead counts whole seconds once they are over; a task archived in the current second is
            # already in `failed` and in the unsettled tail, so it is not a retry. Summed over polls
            # this is exactly failed attempts minus archived tasks; a transient negative is carried.
            unsettled = archived[(q, "unsettled")] - unsettled_before.get(q, 0)
            retried = d_failed - dead - unsettled + carry[q]
            carry[q] = min(retried, 0)
            for outcome, jobs in (
                ("succeeded", d_processed - d_failed),
                ("dead", dead),
                ("retried", max(retried, 0)),
            ):
                if jobs > 0:
                    finished.append(Finished(q, KIND, outcome, jobs, at))  # type: ignore[arg-type]
        return finished


PRESET = AsynqPreset()
