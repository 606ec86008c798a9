"""dn2's configuration: one frozen, typed object per stage, validated once when built.

pipelines.options builds them from the command line; the jobs, graphs and stages take
them whole. Checks that need the data (the number of normal images, say) happen where
the data is read: check_fit_size. Every refusal here is a ConfigError (dn2ops.errors: the
user's mistake, and a ValueError, as scikit-learn's estimators raise for bad parameters).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

from dn2ops import transforms
from dn2ops.errors import ConfigError

# Images declaring more pixels are refused as decompression bombs: PIL's own default
# (Image.MAX_IMAGE_PIXELS), ~ 9459 x 9459, about 256 MiB of 24-bit RGB once decoded.
DEFAULT_MAX_PIXELS = 89_478_485
# Normal images whose leave-one-out scores form the percentile reference by default:
# enough to put every percentile within about one point (index.streams.percentile_error),
# and a build that stays linear in n (exact leave-one-out over all n costs n^2 d).
REFERENCE_SAMPLE = 20_000
# Sampled normal rows on which an approximate index's recall@k is measured at build time.
RECALL_QUERIES = 500

# The most accurate backbone measured with offline weights (README, "Accuracy, as
# measured"); efficientnet_lite0 alone embeds about twice as fast.
DEFAULT_BACKBONE = "efficientnet_lite0+efficientnet_lite1"
POOLS = ("mean", "max")
# Flags (dn2ops.score.decisions): Benjamini-Hochberg's false discovery rate by default
# (--fdr), or a per-row level (--alpha).
FLAG_RULES = ("fdr", "alpha")
DEFAULT_FDR = 0.05
GROUP_METHODS = ("knn", "covtrace")

# Neighbours of the cleaning pass's leave-one-out score (``clean_k=None``). Impurities
# from another class sit next to each other, so a score over 2 neighbours finds only
# part of them; on Fashion-MNIST with 5-20 % impurities (benchmarks/accuracy.py, README)
# a wider neighbourhood removes more of them and recovers more ROC-AUC.
CLEAN_K = 200


def cleaning_k(k: int, clean_k: int | None, n: int) -> int:
    """Neighbours of the cleaning score: ``clean_k`` (None: max(k, CLEAN_K)), at most n - 1."""
    return min(max(k, CLEAN_K) if clean_k is None else clean_k, n - 1)


# The auto cleaning rule (``clean_fraction="auto"``, dn2ops.index.cleaning), which needs no
# rate. A row's score s is the log of its mean distance to its k_c nearest other kept rows,
# k_c = CLEAN_AUTO_SHARE of n, at least CLEAN_AUTO_MIN_K, with no upper cap: a neighbourhood
# larger than the clusters impurities form, the same share of n at any size (a cap of 1000
# would mean 0.5 % of n at 200k rows; k_c = 0.5 % of n gave 0.8641 instead of 0.9066 at 5 %
# impurities, research pass of issue 27). A row goes when s - median > min(CLEAN_AUTO_Z x
# 1.4826 MAD, CLEAN_AUTO_RATIO) (median and MAD of the kept rows' scores); the scores are
# computed again against the rows kept until the kept set stops changing, at most
# CLEAN_AUTO_ROUNDS rounds. The pass scores
# every row against a uniform sample of CLEAN_SAMPLE rows with k_s = k_c m / n neighbours
# (5 % of the sample), so it stays linear in n. Below CLEAN_AUTO_MIN_ROWS rows (group mode:
# sets) nothing is removed. Measured on the full protocol: docs/accuracy.md,
# benchmarks/contamination.py.
CLEAN_AUTO_SHARE = 0.05
CLEAN_AUTO_MIN_K = 10
CLEAN_AUTO_Z = 3.0
# The cap on the threshold above the median (log units: a neighbourhood e^0.25 = 1.28x as
# wide as the median row's), whatever the spread: a contaminated set's MAD is inflated by
# its impurities, so 3 MAD alone removed too few (5 % impurities: 0.8798 without the cap,
# 0.9066 with it, research pass of issue 27). Being absolute, it removes more of a clean
# set whose scores spread wide (low intrinsic dimension: docs/accuracy.md). None: no cap.
CLEAN_AUTO_RATIO: float | None = 0.25
CLEAN_AUTO_ROUNDS = 20
# The rule's median and MAD need a few dozen scores (the research rule's minimum; clean
# subsets of one digit lose 2.6 % at 50 rows, 1.3 % at 100: docs/accuracy.md).
CLEAN_AUTO_MIN_ROWS = 50
# 5,000 (not 10,000): scoring n rows against the sample is n m d, the build's percentile
# reference 20,000 n d; at 10,000 the default build took 1.7x a --no-clean one at 50,000
# 2560-d rows, at 5,000 about 1.3x (benchmarks/build_scale.py), with the same rows removed.
CLEAN_SAMPLE = 5_000
CLEAN_RULES = ("off", "fraction", "auto")


def clean_rule(clean_fraction: float | str) -> str:
    """The cleaning rule a ``clean_fraction`` asks for: 'auto', 'fraction' (> 0) or 'off'."""
    if clean_fraction == "auto":
        return "auto"
    return "fraction" if clean_fraction > 0 else "off"


def is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_params(*, k: Any, n_centroids: Any, clean_fraction: Any, clean_k: Any) -> None:
    """Raises ConfigError (a ValueError) unless the hyperparameters are of the right type
    and range."""
    if not is_int(k) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    if n_centroids is not None and (not is_int(n_centroids) or n_centroids < 1):
        raise ConfigError(
            f"n_centroids must be None or a positive integer, got {n_centroids!r}")
    cf = clean_fraction
    if not isinstance(cf, numbers.Real) or isinstance(cf, bool) or not 0.0 <= cf < 1.0:
        raise ConfigError(f"clean_fraction must be a float in [0, 1), got {cf!r}")
    if clean_k is not None and (not is_int(clean_k) or clean_k < 1):
        raise ConfigError(f"clean_k must be None or a positive integer, got {clean_k!r}")


def check_fit_size(*, k: int, n_centroids: int | None, clean_fraction: float, n: int) -> None:
    """Raises ConfigError (a ValueError) unless n training rows suffice for these
    hyperparameters."""
    if n < 1:
        raise ConfigError("X must contain at least one training sample, got n=0")
    # kNN mode needs k neighbours for scoring and k OTHER points for the
    # leave-one-out train_scores_; cleaning needs the latter in any mode.
    if (n_centroids is None or clean_fraction > 0) and k > n - 1:
        raise ConfigError(
            f"k={k} is too large for n={n} training samples: need "
            f"k <= n - 1 because leave-one-out scoring excludes each point itself"
        )
    if n_centroids is not None and n_centroids > n:
        raise ConfigError(
            f"n_centroids={n_centroids} is larger than the number of "
            f"training samples n={n}"
        )


# Images a CPU engine runs at once (``engine_batch=None``): a model call of ``batch_size``
# images runs in slices of this many. An engine's working memory grows with the images it
# runs at once (ONNX Runtime keeps its arena at the largest slice seen), its speed hardly:
# dn2 embed, default backbone, 1,000 PNGs, one process on 2 cores: slices of 64 peaked at
# 3.88 GiB, of 16 at 1.68 GiB, of 8 at 1.29 GiB, in 25.2 / 21.1 / 20.9 s
# (benchmarks/worker_memory.py, docs/memory.md). On a GPU a slice is the whole batch.
CPU_ENGINE_BATCH = 8


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
    """How images become features: the embedding flags, passed whole to
    dn2ops.embed.plan.EmbedPlan, which the embedding stage and the engines take.

    ``batch_size``: images a model call gets (RunInference's batch: what is read and
    decoded ahead, and what one call hands on); ``engine_batch``: images the engine runs at
    once within a call (None: CPU_ENGINE_BATCH on a CPU, the whole batch on a GPU).
    ``cache_dir``: the directory of dn2's cache (the CPU engines' ONNX exports; None:
    $DN2_CACHE_DIR, else the user's XDG cache, resolved where the model loads: see
    dn2ops.embed.export.cache_root). ``share_model``: auto | on | off, whether the SDK
    processes of a machine share one model (dn2ops.engines.base.shares_model)."""

    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    batch_size: int = 64
    device: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS
    engine: str = "auto"
    decode: str = "draft"
    threads: int | None = None
    decode_threads: int | None = None
    max_in_flight: int | None = None
    cache_dir: str | None = None
    engine_batch: int | None = None
    share_model: str = "auto"


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """The shape of an index (dn2 build-index's flags; see dn2ops.index.build_index).

    ``feature_transform``: a dn2ops.transforms name. Its two defaults differ on purpose:

    - here, for code that builds an ``IndexConfig`` itself: ``none``, the identity (the
      paper's raw features), so that nothing transforms vectors unasked, and the one
      transform an index of sets takes (GroupConfig.check_index refuses the others);
    - on the command line (pipelines.options.job_config, without --feature-transform):
      ``root4-l2`` (transforms.DEFAULT, the most accurate measured; see dn2ops.transforms)
      for single images, and ``none`` with --group-by.

    ``clean_fraction``: which normal rows are removed before the index is built
    (dn2ops.index.cleaning): ``"auto"`` (the rule that needs no rate), a fraction F in
    (0, 1) (the F n rows of highest leave-one-out score over ``clean_k`` neighbours), or 0
    (off). Its defaults differ as the transform's do: 0 here, so that nothing is removed
    unasked, and ``auto`` on the command line (pipelines.options.job_config).
    ``clean_sample``: the rows the auto rule scores against (None: all; exact, n^2).
    """

    k: int = 2
    n_centroids: int | None = None
    clean_fraction: float | str = 0.0
    clean_k: int | None = None
    clean_sample: int | None = CLEAN_SAMPLE
    shards: int | None = 1
    ivf_lists: int | None = None
    pq_m: int | None = None
    nprobe: int | None = None
    target_recall: float = 0.95
    ondisk: bool = False
    hnsw_m: int | None = None
    ef_search: int | None = None
    reference_sample: int | None = REFERENCE_SAMPLE
    feature_transform: str = "none"
    recall_queries: int = RECALL_QUERIES
    seed: int = 1234

    def __post_init__(self) -> None:
        if isinstance(self.clean_fraction, str) and self.clean_fraction != "auto":
            raise ConfigError(f"clean_fraction must be 'auto' or a float in [0, 1), "
                              f"got {self.clean_fraction!r}")
        check_params(k=self.k, n_centroids=self.n_centroids,
                     clean_fraction=0.0 if self.clean_fraction == "auto" else self.clean_fraction,
                     clean_k=self.clean_k)
        if self.clean_sample is not None and (not is_int(self.clean_sample)
                                              or self.clean_sample < 2):
            raise ConfigError(f"clean_sample must be None or an integer >= 2, "
                              f"got {self.clean_sample!r}")
        if self.shards is not None and self.shards < 1:
            raise ConfigError(f"--shards must be >= 1, got {self.shards}")
        modes = [f for f, v in (("--ivf", self.ivf_lists), ("--kmeans", self.n_centroids),
                                ("--hnsw", self.hnsw_m)) if v is not None]
        if len(modes) > 1:
            raise ConfigError(f"{' and '.join(modes)} are different index modes; choose one")
        if self.ivf_lists is None and (self.pq_m or self.nprobe or self.ondisk):
            raise ConfigError("--pq, --nprobe and --ondisk need --ivf NLIST")
        if self.hnsw_m is None and self.ef_search is not None:
            raise ConfigError("--ef-search needs --hnsw M")
        transforms.check(self.feature_transform)
        if self.reference_sample is not None and self.reference_sample < 1:
            raise ConfigError(f"--reference-sample must be >= 1, got {self.reference_sample}")

    @property
    def approximate(self) -> bool:
        return self.ivf_lists is not None or self.hnsw_m is not None

    @property
    def clean_rule(self) -> str:
        """'auto', 'fraction' or 'off' (dn2ops.index.cleaning)."""
        return clean_rule(self.clean_fraction)


@dataclasses.dataclass(frozen=True)
class GroupConfig:
    """Scoring sets of images (dn2ops.score.sets): the key, the pooling, the method.

    ``pool`` None: the index's own (scoring) or mean (building an index of sets).
    """

    group_by: str
    pool: str | None = None
    method: str = "knn"

    def __post_init__(self) -> None:
        if self.method not in GROUP_METHODS:
            raise ConfigError(f"--group-score must be one of {GROUP_METHODS}, "
                              f"got {self.method!r}")
        if self.pool is not None and self.pool not in POOLS:
            raise ConfigError(f"--pool must be one of {POOLS}, got {self.pool!r}")
        if self.method == "covtrace" and self.pool:
            raise ConfigError("--pool is not used by --group-score covtrace (it scores the "
                              "members' spread)")

    @property
    def covtrace(self) -> bool:
        return self.method == "covtrace"

    def check_index(self, index: IndexConfig) -> None:
        """An index of sets is a small exact one: refuses the flags it does not take."""
        if (index.approximate or index.reference_sample != REFERENCE_SAMPLE
                or index.feature_transform != "none" or index.clean_k is not None):
            raise ConfigError("--ivf, --hnsw, --reference-sample, --feature-transform and "
                              "--clean-k are not available with --group-by")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """How a scoring worker holds and searches an index (dn2ops.index.LoadedIndex).

    ``stream_shards``: load flat shards one at a time per batch; ``device``: faiss's
    (auto, cpu, cuda); ``faiss_threads``: faiss's OpenMP threads, kept low because
    faiss's pool beside the other stages' threads oversubscribes the cores.
    """

    stream_shards: bool = False
    device: str = "auto"
    faiss_threads: int = 1


@dataclasses.dataclass(frozen=True)
class FlagConfig:
    """Which scored rows are flagged (dn2ops.score.decisions), from their p-values against
    the index's normal reference.

    ``rule`` ``fdr`` (--fdr Q): Benjamini-Hochberg at level Q across the partition, so
    that among the flagged rows at most a fraction Q are expected to be normal ones;
    ``alpha`` (--alpha A): every row with p <= A. ``level`` in (0, 1).
    """

    rule: str = "fdr"
    level: float = DEFAULT_FDR

    def __post_init__(self) -> None:
        if self.rule not in FLAG_RULES:
            raise ConfigError(f"flag rule must be one of {FLAG_RULES}, got {self.rule!r}")
        lv = self.level
        if not isinstance(lv, numbers.Real) or isinstance(lv, bool) or not 0.0 < lv < 1.0:
            raise ConfigError(f"--{self.rule} must be in (0, 1), got {lv!r}")


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """What dn2 score writes besides the ranked table, and how it flags rows.

    ``explain``: the top-ranked images that get a heatmap (--explain N; 0: none); None:
    the --top images, at most 20, or the flagged ones when more, at most 100
    (dn2ops.score.heatmaps.explain_count)."""

    partition: str = ""
    top: int | None = None
    max_error_fraction: float | None = None
    report: bool = False
    flags: FlagConfig = FlagConfig()
    explain: int | None = None

    def __post_init__(self) -> None:
        if self.top is not None and self.top < 1:
            raise ConfigError(f"--top must be >= 1, got {self.top}")
        if self.explain is not None and self.explain < 0:
            raise ConfigError(f"--explain must be >= 0, got {self.explain}")
        if self.max_error_fraction is not None and not 0 <= self.max_error_fraction < 1:
            raise ConfigError(f"--max-error-fraction must be in [0, 1), "
                              f"got {self.max_error_fraction}")


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """Everything one dn2 command was asked, checked together once (pipelines.options).

    ``group`` None: images are scored one by one; ``search.device`` is faiss's device
    (dn2 run and score: --device, as embedding's).
    """

    embed: EmbedConfig = EmbedConfig()
    index: IndexConfig = IndexConfig()
    score: ScoreConfig = ScoreConfig()
    search: SearchConfig = SearchConfig()
    group: GroupConfig | None = None

    def __post_init__(self) -> None:
        if self.group is not None:
            self.group.check_index(self.index)
            if self.score.report:
                raise ConfigError("--report shows single images; it is not available with "
                                  "--group-by")

    @property
    def covtrace(self) -> bool:
        """Sets scored by their own spread: no normal images, no index."""
        return self.group is not None and self.group.covtrace
