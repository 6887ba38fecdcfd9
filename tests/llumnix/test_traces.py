import numpy as np
import pytest

from llumnix.sim.traces import (
    TraceRequest,
    arrivals,
    fit_power_law,
    generate,
    load_jsonl,
    sample_lengths,
    save_jsonl,
)


@pytest.mark.parametrize(
    ("dist", "which", "p50", "p99", "mean"),
    [
        ("sharegpt", "input", 74, 3388, 306),
        ("sharegpt", "output", 487, 1234, 500),
        ("burstgpt", "input", 582, 3549, 830),
        ("burstgpt", "output", 243, 964, 271),
    ],
)
def test_dataset_fits_match_published_quantiles(dist, which, p50, p99, mean):
    x = sample_lengths(dist, 100_000, np.random.default_rng(0), which, max_tokens=6000)
    assert np.percentile(x, 50) == pytest.approx(p50, rel=0.03)
    assert np.percentile(x, 99) == pytest.approx(p99, rel=0.05)
    assert x.mean() == pytest.approx(mean, rel=0.15)


@pytest.mark.parametrize(("dist", "mean", "p50"), [("S", 128, 38), ("M", 256, 32), ("L", 512, 55)])
def test_power_law_families_match_mean_and_median(dist, mean, p50):
    x = sample_lengths(dist, 200_000, np.random.default_rng(1), max_tokens=6000)
    assert x.mean() == pytest.approx(mean, rel=0.05)
    assert np.percentile(x, 50) == pytest.approx(p50, rel=0.08)
    assert x.max() <= 6000
    x_min, a = fit_power_law(mean, p50)
    assert 1 <= x_min < p50 and a > 0


def test_gamma_arrivals_have_the_requested_rate_and_cv():
    rng = np.random.default_rng(2)
    t = arrivals(50_000, 4.0, rng, cv=3.0)
    gaps = np.diff(t)
    assert 1 / gaps.mean() == pytest.approx(4.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.1)
    poisson = np.diff(arrivals(50_000, 4.0, rng))
    assert poisson.std() / poisson.mean() == pytest.approx(1.0, rel=0.05)


def test_generate_is_deterministic_and_mixes_priorities():
    a = generate(2000, 5.0, "S-L", seed=7, high_priority_fraction=0.1)
    b = generate(2000, 5.0, "S-L", seed=7, high_priority_fraction=0.1)
    assert a == b
    assert 0.07 < sum(r.priority for r in a) / len(a) < 0.13
    assert np.mean([r.input_tokens for r in a]) < np.mean([r.output_tokens for r in a])
    with pytest.raises(ValueError):
        generate(10, 1.0, "X-Y")


def test_jsonl_round_trip_and_optional_fields(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(
        '{"arrival_s": 1.5, "input_tokens": 10, "output_tokens": 3}\n'
        '{"arrival_s": 0.5, "input_tokens": 20, "output_tokens": 4, "priority": 1,'
        ' "prefix_id": "sys", "prefix_tokens": 8}\n'
    )
    t = load_jsonl(path)
    assert [r.arrival_s for r in t] == [0.5, 1.5]
    assert t[0] == TraceRequest("r1", 0.5, 20, 4, 1, "sys", 8)
    save_jsonl(t, tmp_path / "u.jsonl")
    assert load_jsonl(tmp_path / "u.jsonl") == t
