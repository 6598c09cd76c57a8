from prometheus_client.parser import text_string_to_metric_families
from pyrsia_node.config import Weights
from pyrsia_node.metrics import Counters, LoadSample, LoadSampler, NodeMetrics, quality_score


def test_quality_score_is_the_weighted_sum() -> None:
    sample = LoadSample(
        cpu_load=2.0,
        network_packets_per_second=1000.0,
        disk_operations_per_second=50.0,
        uploads_in_flight=3,
    )
    weights = Weights(cpu=1.0, network=0.001, disk=0.02, uploads=0.5)
    assert quality_score(sample, weights) == 2.0 + 1.0 + 1.0 + 1.5


def test_busier_node_scores_higher() -> None:
    weights = Weights()
    idle = LoadSample(0.1, 10.0, 1.0, 0)
    busy = LoadSample(1.5, 5000.0, 300.0, 4)
    assert quality_score(busy, weights) > quality_score(idle, weights)


def test_sampler_turns_counters_into_rates() -> None:
    readings = iter([Counters(100, 10), Counters(400, 30)])
    times = iter([10.0, 12.0])
    sampler = LoadSampler(lambda: next(readings), lambda: 0.5, lambda: next(times))
    sample = sampler.sample(uploads_in_flight=1)
    assert sample == LoadSample(0.5, 150.0, 10.0, 1)


def test_sampler_treats_counter_reset_as_zero() -> None:
    readings = iter([Counters(1000, 100), Counters(10, 1)])
    times = iter([0.0, 1.0])
    sampler = LoadSampler(lambda: next(readings), lambda: 0.0, lambda: next(times))
    sample = sampler.sample(0)
    assert sample.network_packets_per_second == 0.0
    assert sample.disk_operations_per_second == 0.0


def test_exposition_parses_and_carries_score() -> None:
    metrics = NodeMetrics(Weights(cpu=2.0), role="peer", version="test")
    metrics.record(LoadSample(1.25, 0.0, 0.0, 0))
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    assert families["pyrsia_node_quality_score"].samples[0].value == 2.5
    assert families["pyrsia_node_load_cpu"].samples[0].value == 1.25
    assert "process_cpu_seconds" in families
