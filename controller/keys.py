"""Every Redis key the controller uses, in one place."""

from __future__ import annotations

PREFIX = "shoal"

RUNTIMES = f"{PREFIX}:runtimes"  # hash: name -> runtime JSON
FUNCTIONS = f"{PREFIX}:functions"  # hash: name -> function JSON (latest version and its metadata)
CALLS = f"{PREFIX}:calls"  # zset: call id -> created (ms); every call kept within the retention
ACTIVE = f"{PREFIX}:active"  # zset: call id -> created (ms); calls not yet terminal (the durable queue)
CALL_NUM = f"{PREFIX}:callnum"  # counter behind the seed API's integer callNum
NODES = f"{PREFIX}:nodes"  # hash: node id -> last known node JSON
ENDPOINTS = f"{PREFIX}:endpoints"  # hash: endpoint id -> when it last registered (POST /register), unix seconds
ENDPOINTS_BY_TIME = f"{PREFIX}:endpoints:by-time"  # zset: the same, by that time (the oldest are forgotten first)


def versions(function: str) -> str:
    return f"{PREFIX}:function:{function}:versions"  # hash: version -> function-version JSON


def version_counter(function: str) -> str:
    return f"{PREFIX}:function:{function}:version"


def call(call_id: str) -> str:
    return f"{PREFIX}:call:{call_id}"  # hash: the call's fields


def calls_of(function: str) -> str:
    return f"{PREFIX}:calls:fn:{function}"  # zset: call id -> created (ms)


def call_by_num(num: int) -> str:
    return f"{PREFIX}:callnum:{num}"  # string: call id


def idempotency(key: str) -> str:
    return f"{PREFIX}:idem:{key}"  # string: call id


def batch_idempotency(key: str) -> str:
    return f"{PREFIX}:idem-batch:{key}"  # string: the batch's call ids, comma-separated
