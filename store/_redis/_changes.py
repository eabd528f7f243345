"""Waking readers after a committed write on Redis: this node's own writes wake its readers
as soon as the write's reply arrives; other nodes' writes arrive on the ``changes`` channel,
which every write script publishes to after its write (so never before it).

A subscriber that lost its connection may have missed messages: when it is back, every
waiting reader is woken to read again. Readers also read again after ``MAX_WAIT`` without a
wake-up, so nothing waits forever on a message that never came.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
from redis.asyncio import Redis
from redis.exceptions import RedisError

logger = logging.getLogger("keepstream.store.redis")

# The longest a reader waits without reading again, woken or not.
MAX_WAIT = 1.0
RESUBSCRIBE_DELAY = 0.2


async def listen(
    client: Redis,
    channel: str,
    node_id: str,
    changed: Callable[[list[str]], None],
    maybe_missed: Callable[[], None],
) -> None:
    """Call ``changed`` with the streams other nodes' writes changed, as they publish them
    on ``channel`` (and those any node announces to every node, as ``*``), forever.
    Resubscribes after a lost connection, calling ``maybe_missed`` (messages may have been
    lost) when it is subscribed again, and when it was lost."""
    own = node_id.encode()
    while True:
        try:
            async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                await pubsub.subscribe(channel)
                maybe_missed()
                async for message in pubsub.listen():
                    node, *stream_ids = message["data"].split(b" ")
                    if node != own:
                        changed([sid.decode() for sid in stream_ids])
        except (RedisError, OSError) as exc:
            logger.warning("change subscription lost (%s); subscribing again", exc)
            maybe_missed()
            await anyio.sleep(RESUBSCRIBE_DELAY)
