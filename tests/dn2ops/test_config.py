"""dn2ops.config: each check in one place, made when the configuration is built."""

from __future__ import annotations

import dataclasses

import pytest

from dn2ops.config import (
    DEFAULT_BACKBONE,
    DEFAULT_MAX_PIXELS,
    REFERENCE_SAMPLE,
    EmbedConfig,
    GroupConfig,
    IndexConfig,
    JobConfig,
    ScoreConfig,
    SearchConfig,
    check_fit_size,
)
from dn2ops.errors import ConfigError
from dn2ops.transforms import DEFAULT as DEFAULT_TRANSFORM


@pytest.mark.parametrize("kwargs, message", [
    ({"ondisk": True}, "--ondisk need --ivf"),
    ({"pq_m": 8}, "--pq, --nprobe and --ondisk need --ivf"),
    ({"ivf_lists": 4, "n_centroids": 2}, "--ivf and --kmeans are different index modes"),
    ({"ivf_lists": 4, "hnsw_m": 8}, "--ivf and --hnsw are different index modes"),
    ({"ef_search": 16}, "--ef-search needs --hnsw"),
    ({"shards": 0}, "--shards must be >= 1"),
    ({"reference_sample": 0}, "--reference-sample must be >= 1"),
    ({"feature_transform": "cube"}, "must be one of"),
    ({"k": 0}, "k must be a positive integer"),
    ({"clean_fraction": 1.0}, r"clean_fraction must be a float in \[0, 1\)"),
    ({"clean_k": 0}, "clean_k must be None or a positive integer"),
    ({"clean_fraction": "sometimes"}, "clean_fraction must be 'auto' or a float"),
    ({"clean_sample": 1}, "clean_sample must be None or an integer >= 2"),
])
def test_index_config_refuses_what_no_build_can_do(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        IndexConfig(**kwargs)


def test_index_config_is_frozen_and_keeps_what_it_was_given():
    cfg = IndexConfig(k=3, ivf_lists=16, pq_m=8, nprobe=4, ondisk=True)
    assert (cfg.k, cfg.ivf_lists, cfg.pq_m, cfg.nprobe, cfg.ondisk) == (3, 16, 8, 4, True)
    assert cfg.approximate and not IndexConfig().approximate
    # the library's default transform is the identity; the command line's is DEFAULT
    assert IndexConfig().feature_transform == "none" != DEFAULT_TRANSFORM == "root4-l2"
    # the library does not clean unasked; the command line's default is auto
    assert IndexConfig().clean_rule == "off"
    assert IndexConfig(clean_fraction="auto").clean_rule == "auto"
    assert IndexConfig(clean_fraction=0.1).clean_rule == "fraction"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.k = 4


@pytest.mark.parametrize("kwargs, message", [
    ({"group_by": "lot", "method": "median"}, "--group-score must be one of"),
    ({"group_by": "lot", "pool": "sum"}, "--pool must be one of"),
    ({"group_by": "lot", "pool": "mean", "method": "covtrace"}, "--pool is not used"),
])
def test_group_config_checks(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        GroupConfig(**kwargs)


@pytest.mark.parametrize("index", [
    IndexConfig(hnsw_m=8), IndexConfig(ivf_lists=4), IndexConfig(clean_k=5),
    IndexConfig(reference_sample=REFERENCE_SAMPLE + 1), IndexConfig(feature_transform="l2"),
])
def test_an_index_of_sets_is_exact_and_untransformed(index):
    with pytest.raises(ConfigError, match="not available with --group-by"):
        JobConfig(index=index, group=GroupConfig(group_by="lot"))
    assert JobConfig(index=index).group is None  # fine for images


def test_job_config_refuses_a_report_of_sets_and_knows_covtrace():
    with pytest.raises(ConfigError, match="--report shows single images"):
        JobConfig(score=ScoreConfig(report=True), group=GroupConfig(group_by="lot"))
    assert JobConfig(group=GroupConfig(group_by="lot", method="covtrace")).covtrace
    assert not JobConfig(group=GroupConfig(group_by="lot")).covtrace
    assert not JobConfig().covtrace


@pytest.mark.parametrize("kwargs, message", [
    ({"top": 0}, "--top must be >= 1"),
    ({"max_error_fraction": 1.0}, r"--max-error-fraction must be in \[0, 1\)"),
])
def test_score_config_checks(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ScoreConfig(**kwargs)


def test_embed_and_search_config_defaults():
    """The embedding's defaults are the command line's (pipelines.options)."""
    assert dataclasses.asdict(EmbedConfig()) == {
        "backbone": DEFAULT_BACKBONE, "weights": None, "batch_size": 64, "device": "auto",
        "max_pixels": DEFAULT_MAX_PIXELS, "engine": "auto", "decode": "draft",
        "threads": None, "decode_threads": None, "max_in_flight": None, "cache_dir": None,
        "engine_batch": None, "share_model": "auto"}
    assert SearchConfig() == SearchConfig(stream_shards=False, device="auto", faiss_threads=1)


@pytest.mark.parametrize("kwargs, message", [
    ({"k": 2, "n_centroids": None, "clean_fraction": 0.0, "n": 0}, "at least one training"),
    ({"k": 5, "n_centroids": None, "clean_fraction": 0.0, "n": 5}, "k=5 is too large for n=5"),
    ({"k": 1, "n_centroids": 9, "clean_fraction": 0.0, "n": 5}, "n_centroids=9 is larger"),
])
def test_too_few_normal_images_for_the_flags_is_a_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        check_fit_size(**kwargs)
    check_fit_size(**{**kwargs, "n": 10})  # enough
