"""dn2ops.io.progress: the progress lines of long steps, with a fake clock."""

from __future__ import annotations

from dn2ops.io import progress


def test_cleaning_logs_progress_and_warns_once_when_it_will_be_long(caplog):
    now = iter([0.0, 10.0, 20.0, 50.0, 60.0])
    p = progress.Progress(100, "cleaning", every=30.0, warn_after=60.0, clock=lambda: next(now))
    with caplog.at_level("INFO", logger="dn2"):
        p.update(10)  # 10 s for 10 rows: 90 s to go -> the one warning
        p.update(20)  # 80 s to go, warned already, 10 s since the last line: quiet
        p.update(50)  # 50 s to go, 40 s since the last line: a progress line
        p.update(100)  # done: a last line
    got = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert got == [
        ("WARNING", "cleaning: 10 of 100 done; about 2 min more (the cost grows with the "
                    "square of the normal set)"),
        ("INFO", "cleaning: 50 of 100 done, ETA 50 s"),
        ("INFO", "cleaning: 100 of 100 done, ETA 0 s")]


def test_log_progress_stage_passes_every_element_through():
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from pipelines.options import LOCAL_RUNNER

    with TestPipeline(runner=LOCAL_RUNNER) as p:
        out = (p | beam.Create(list(range(50)))
               | beam.ParDo(progress.LogProgress("testing", every_s=0.0), total=50))
        assert_that(out, equal_to(list(range(50))))
