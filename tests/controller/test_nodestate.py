"""What the dispatcher asks of a node's state before sending it a call."""

from __future__ import annotations

from controller.nodestate import DEFAULT_QUEUE_LIMIT, NodeState


def node(**hello: object) -> NodeState:
    return NodeState("n1", dict({"v": 1, "node_id": "n1", "capacity": 2}, **hello), capacity=2)


def test_no_more_calls_of_a_function_than_the_node_queues_are_sent() -> None:
    n = node(queue_limit=3)
    n.warm_busy["f@1"] = 2
    assert n.has_room("f@1", oversubscribe=64)
    n.warm_busy["f@1"] = 3  # a fourth would come back REJECTED (QueueFull) and be placed again
    assert not n.has_room("f@1", oversubscribe=64)
    assert n.has_room("g@1", oversubscribe=64)  # each function has its own queue on the node


def test_the_overall_bound_still_applies_and_a_silent_hello_gets_the_default() -> None:
    n = node()
    assert n.queue_limit == DEFAULT_QUEUE_LIMIT
    n.inflight.update({"a", "b", "c", "d"})
    assert not n.has_room("f@1", oversubscribe=2)
    assert node(queue_limit=True).queue_limit == DEFAULT_QUEUE_LIMIT  # a bool is not a bound
