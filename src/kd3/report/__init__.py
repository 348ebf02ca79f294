"""``kd3 report``: a self-contained HTML page (plus PNGs) describing one run directory.

Kept import-free so that building the ``kd3`` parser does not pull in matplotlib; the entry
point is :func:`kd3.report.build.write_report`.
"""
