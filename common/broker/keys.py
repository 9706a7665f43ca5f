"""Every Redis key and pub/sub channel name fanout uses, in one place.

Per channel, all keys share the hash tag ``{<channel>}`` so that in Redis Cluster they sit
in one slot, as the Lua scripts that touch them together require.

    <prefix>:{<channel>}:meta         hash   epoch, top (last assigned offset)
    <prefix>:{<channel>}:stream       stream history; entry id "<offset>-0", fields d, k, t
    <prefix>:{<channel>}:snap         hash   snapshot: key -> latest value (JSON); key "" if unkeyed
    <prefix>:{<channel>}:ids:<b>      hash   upstream message id -> "<epoch>:<offset>" of the
                                      ids published in time bucket <b> (publisher's clock
                                      in s // idempotency TTL); expires 2 TTLs after its
                                      last write
    <prefix>:live:{<channel>}         pub/sub channel of live messages for the edges
    <prefix>:probe:<node>             pub/sub channel an edge publishes to itself (liveness)
    <prefix>:probe:<node>:{<n>}       in Redis Cluster, the same per shard: sharded pub/sub,
                                      <n> picked so that it hashes to that shard's slots

Per ingest feed (leader election, see ingest/leader.py), both under the hash tag ``{<feed>}``
so that the lease scripts, which touch both, run in one slot:

    <prefix>:lease:{<feed>}           string "<token>:<owner>" of the leader, with a PX TTL
    <prefix>:fence:{<feed>}           string counter: the last fencing token handed out

The channel meta hash also holds ``fence``: the highest fencing token that published to the
channel (publish.lua rejects a lower one).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "fanout"


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one prefix (tests use a prefix of their own)."""

    prefix: str = DEFAULT_PREFIX

    def meta(self, channel: str) -> str:
        return f"{self.prefix}:{{{channel}}}:meta"

    def stream(self, channel: str) -> str:
        return f"{self.prefix}:{{{channel}}}:stream"

    def snapshot(self, channel: str) -> str:
        return f"{self.prefix}:{{{channel}}}:snap"

    def idempotency(self, channel: str, bucket: int) -> str:
        """The hash of the message ids published to `channel` in time bucket `bucket`."""
        return f"{self.prefix}:{{{channel}}}:ids:{bucket}"

    def live(self, channel: str) -> str:
        return f"{self.prefix}:live:{{{channel}}}"

    def live_prefix(self) -> str:
        return f"{self.prefix}:live:{{"

    def channel_of_live(self, live: str) -> str:
        """Inverse of `live`: the fanout channel a pub/sub message came on."""
        return live[len(self.prefix) + 7 : -1]

    def probe(self, node_id: str) -> str:
        return f"{self.prefix}:probe:{node_id}"

    def shard_probe(self, node_id: str, tag: int) -> str:
        return f"{self.prefix}:probe:{node_id}:{{{tag}}}"

    def lease(self, feed: str) -> str:
        return f"{self.prefix}:lease:{{{feed}}}"

    def fence(self, feed: str) -> str:
        return f"{self.prefix}:fence:{{{feed}}}"


def idempotency_bucket(idempotency_ttl: int, now: float) -> int:
    """The time bucket (the publisher's clock `now`, s) whose hash takes the ids published
    now; publish.lua looks an id up in it and in the one before."""
    return int(now) // max(idempotency_ttl, 1)
