import numpy as np
import pandas as pd
import pytest

from probes.datasets import ENTITY_DATASETS, load_entities, load_jailbreakbench, load_nqswap, load_refusal_instructions


def test_world_places_keep_the_file_split():
    data = load_entities("world_place")
    assert len(data) > 39_000 and data.targets.shape == (len(data), 2)
    assert data.target_names == ["latitude", "longitude"]
    assert 0.15 < data.is_test.mean() < 0.25
    assert (np.abs(data.targets[:, 0]) <= 90).all() and (np.abs(data.targets[:, 1]) <= 180).all()
    assert len(set(data.entities)) == len(data)


@pytest.mark.parametrize("name", sorted(ENTITY_DATASETS))
def test_every_entity_dataset_loads_its_most_popular_rows(name):
    data = load_entities(name, n=50)
    assert len(data) == 50 == len(data.entities) == len(data.is_test) == len(data.targets)
    assert np.isfinite(data.targets).all() and all(data.entities)
    assert data.kind in ("space", "time")
    if ENTITY_DATASETS[name].popularity:
        column = ENTITY_DATASETS[name].popularity
        full = load_entities(name)
        assert data.frame[column].min() >= full.frame[column].quantile(0.9)


def test_time_targets_are_years():
    art = load_entities("art", n=200)
    assert art.entities[0].count(" by ") >= 1 and 1000 < art.targets.min() and art.targets.max() < 2030
    headlines = load_entities("headline", n=100, seed=3)
    assert 1980 <= headlines.targets.min() and headlines.targets.max() <= 2025.01
    assert "decade" in headlines.frame


def test_seeded_split_when_the_file_has_none(tmp_path):
    path = tmp_path / "places.csv"
    pd.DataFrame({"name": [f"place {i}" for i in range(200)], "latitude": np.linspace(-50, 50, 200),
                  "longitude": np.linspace(-100, 100, 200)}).to_csv(path, index=False)
    a = load_entities("world_place", source=path, seed=1)
    b = load_entities("world_place", source=path, seed=1)
    assert len(a) == 200 and np.array_equal(a.is_test, b.is_test) and 0.1 < a.is_test.mean() < 0.3


def test_refusal_and_nqswap_loaders():
    assert len(load_refusal_instructions("train", "harmful")) == 260
    assert len(load_refusal_instructions("val", "harmless")) == 6264
    assert load_jailbreakbench().shape[0] == 100
    nq = load_nqswap(n=20)
    assert len(nq) == 20 and isinstance(nq.loc[0, "sub_answer"], list) and nq.loc[0, "sub_answer"]
    assert len(load_nqswap()) == 4746


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="known"):
        load_entities("mars_place")
    with pytest.raises(ValueError, match="at least 1"):
        load_entities("art", n=0)
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"name": ["x"], "latitude": [1.0]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match="longitude"):
        load_entities("world_place", source=bad)
    with pytest.raises(FileNotFoundError):
        load_entities("world_place", source=tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="kind"):
        load_refusal_instructions("train", "spicy")
