from __future__ import annotations

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
