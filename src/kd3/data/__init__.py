"""Data: labelled sources, web pools (built, cached or ingested), style shifts, contact sheets.

Modules: ``sources`` (load_source, list_sources), ``pool`` (the Pool container), ``pools``
(benchmark pool builders and their cache), ``shifts`` and ``irrelevant`` (what the builders
mix), ``render`` (font-rendered characters), ``ingest`` (image folders), ``grid`` (PNG sheets),
``splits`` (exact allocation and deterministic splits), ``formats`` (on-disk readers).
"""
from kd3.data.grid import save_pool_grid
from kd3.data.ingest import IngestReport, ingest_folder
from kd3.data.pool import Pool
from kd3.data.pools import build_pool, load_or_build_pool
from kd3.data.sources import DataUnavailable, LabelledData, SourceStatus, list_sources, load_source

__all__ = [
    "DataUnavailable", "IngestReport", "LabelledData", "Pool", "SourceStatus", "build_pool",
    "ingest_folder", "list_sources", "load_or_build_pool", "load_source", "save_pool_grid",
]
