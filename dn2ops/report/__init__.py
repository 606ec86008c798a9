"""Render a DN2 results directory as one self-contained HTML report.

The report is meant to be mailed or served from a bucket, so it is a single
file: every image (thumbnails and plots) is embedded as a base64 ``data:``
URI and there is no external CSS or JavaScript. Only committed results
directories (with their ``_SUCCESS`` marker) are rendered.

Sections, each a ``<section id=...>``: ``summary``, ``histogram``, ``top``,
``sample``, ``groups`` (only when group tables exist), ``roc`` (only when the
results carry the label column) and ``errors``.

Modules, one job each: `inputs` (reading the results and the index through
`dn2ops.io.features`), `content` (choosing what to show), `thumbs`, `plots`
(matplotlib), `page` (the Jinja template, autoescaped, in ``templates/``).
"""

from dn2ops.report.content import label_is_anomalous
from dn2ops.report.page import render_report, write_report

__all__ = ["label_is_anomalous", "render_report", "write_report"]
