from __future__ import annotations

from node_agent.agent import Agent
from node_agent.metrics import AgentMetrics


def test_prometheus_text_has_counters_histograms_and_gauges() -> None:
    m = AgentMetrics()
    m.calls.inc(function="f@1", outcome="DONE")
    m.calls.inc(function="f@1", outcome="DONE")
    m.duration.observe(0.003, function="f@1")
    m.duration.observe(2.0, function="f@1")
    m.pool.set(2, pool="f@1", state="idle")
    text = m.render()
    assert 'shoal_calls_total{function="f@1",outcome="DONE"} 2' in text
    assert 'shoal_call_duration_seconds_bucket{function="f@1",le="0.005"} 1' in text
    assert 'shoal_call_duration_seconds_bucket{function="f@1",le="+Inf"} 2' in text
    assert 'shoal_call_duration_seconds_count{function="f@1"} 2' in text
    assert 'shoal_warm_pool_size{pool="f@1",state="idle"} 2' in text
    assert "# TYPE shoal_calls_total counter" in text


def test_a_function_version_forgotten_takes_its_series_with_it(agent: Agent) -> None:
    """Each version that ever ran kept about 20 series (15 histogram buckets): a node with frequent deploys grew,
    and every scrape of /metrics (rendered on the agent's loop) took longer."""
    from shoal.models import FunctionSpec

    for version in (1, 2):
        agent.registry.add_function(FunctionSpec.from_dict(
            {"name": "f", "version": version, "runtime": "rt", "sha256": "0" * 64, "size": 1}))
        key = f"f@{version}"
        agent.metrics.calls.inc(function=key, outcome="DONE")
        agent.metrics.duration.observe(0.01, function=key)
        agent.metrics.cold_starts.inc(function=key)
    agent.forget(agent.registry.functions["f@1"])
    page = agent.metrics.render()
    assert 'function="f@1"' not in page and page.count('function="f@2"') > 15

