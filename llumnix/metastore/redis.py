"""The Redis meta store: instances, statuses and in-flight entries shared by every gateway and
scheduler of a deployment, across hosts.

Keys (``ns`` is the deployment's namespace): ``ns:instance:<id>`` (JSON record, expires after
the registration's ttl: an instance that stops renewing disappears), ``ns:status:<id>`` (JSON
report, expires likewise; a Lua script keeps the newer of two reports), ``ns:inflight:<id>``
(hash: request id -> JSON entry). Every call has ``timeout_s``; any failure raises
:class:`~llumnix.metastore.base.MetaStoreError`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import redis

from llumnix.metastore.base import (
    InFlight,
    InstanceRecord,
    MetaStore,
    MetaStoreError,
    status_from_dict,
    status_to_dict,
)
from llumnix.scheduler.cluster import InstanceStatus

# SET the report unless the stored one is newer.
_PUT_STATUS = """
local old = redis.call('GET', KEYS[1])
if old then
  local ok, t = pcall(function() return cjson.decode(old)['timestamp'] end)
  if ok and t and t > tonumber(ARGV[2]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
"""
# An in-flight hash outlives its newest entry by this much at most.
_INFLIGHT_TTL_MS = 600_000


class RedisMetaStore(MetaStore):
    def __init__(self, url: str, namespace: str = "llumnix", timeout_s: float = 0.5) -> None:
        self.ns = namespace
        try:
            self._r = redis.Redis.from_url(
                url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
            )
            self._put_status = self._r.register_script(_PUT_STATUS)
        except (redis.RedisError, ValueError) as exc:
            raise MetaStoreError(f"bad meta store URL {url!r}: {exc}") from exc

    def _key(self, kind: str, instance_id: str) -> str:
        return f"{self.ns}:{kind}:{instance_id}"

    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except redis.RedisError as exc:
            raise MetaStoreError(f"meta store: {type(exc).__name__}: {exc}") from exc

    def register(self, record: InstanceRecord, ttl_s: float) -> None:
        payload = json.dumps(record.to_dict())
        key = self._key("instance", record.instance_id)
        self._call(lambda: self._r.set(key, payload, px=max(1, int(ttl_s * 1000))))

    def deregister(self, instance_id: str) -> None:
        keys = [self._key(k, instance_id) for k in ("instance", "status", "inflight")]
        self._call(lambda: self._r.delete(*keys))

    def _scan(self, kind: str) -> dict[str, dict[str, Any]]:
        def run() -> dict[str, dict[str, Any]]:
            prefix = f"{self.ns}:{kind}:"
            keys = [k.decode() for k in self._r.scan_iter(match=prefix + "*", count=1000)]
            values = self._r.mget(keys) if keys else []
            out = {}
            for key, value in zip(keys, values, strict=True):
                if value is not None:  # expired between SCAN and MGET
                    out[key[len(prefix) :]] = json.loads(value)
            return out

        try:
            return self._call(run)
        except (ValueError, TypeError) as exc:
            raise MetaStoreError(f"meta store holds a bad {kind} entry: {exc}") from exc

    def instances(self) -> dict[str, InstanceRecord]:
        return {iid: InstanceRecord.from_dict(v) for iid, v in self._scan("instance").items()}

    def put_status(self, status: InstanceStatus, ttl_s: float) -> None:
        payload = json.dumps(status_to_dict(status))
        key = self._key("status", status.instance_id)
        ttl = max(1, int(ttl_s * 1000))
        self._call(lambda: self._put_status(keys=[key], args=[payload, status.timestamp, ttl]))

    def statuses(self) -> dict[str, InstanceStatus]:
        try:
            return {iid: status_from_dict(v) for iid, v in self._scan("status").items()}
        except TypeError as exc:
            raise MetaStoreError(f"meta store holds a bad status: {exc}") from exc

    def add_inflight(self, instance_id: str, entry: InFlight) -> None:
        key = self._key("inflight", instance_id)
        payload = json.dumps([entry.blocks, entry.prefill_tokens, entry.at])

        def run() -> None:
            pipe = self._r.pipeline()
            pipe.hset(key, entry.request_id, payload)
            pipe.pexpire(key, _INFLIGHT_TTL_MS)
            pipe.execute()

        self._call(run)

    def settle(self, instance_id: str, request_ids: Iterable[str]) -> None:
        ids = list(request_ids)
        if ids:
            self._call(lambda: self._r.hdel(self._key("inflight", instance_id), *ids))

    def inflight(self, instance_id: str, now: float, ttl_s: float) -> list[InFlight]:
        key = self._key("inflight", instance_id)
        raw = self._call(lambda: self._r.hgetall(key))
        out, old = [], []
        try:
            for request_id, value in raw.items():
                blocks, tokens, at = json.loads(value)
                if now - at > ttl_s:
                    old.append(request_id)
                else:
                    out.append(InFlight(request_id.decode(), int(blocks), int(tokens), float(at)))
        except (ValueError, TypeError) as exc:
            raise MetaStoreError(f"meta store holds a bad in-flight entry: {exc}") from exc
        if old:
            self._call(lambda: self._r.hdel(key, *old))
        return out

    def close(self) -> None:
        self._r.close()
