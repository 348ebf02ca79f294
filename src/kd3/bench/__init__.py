"""``kd3 bench``: run a benchmark's rows over seeds (cached, resumable) and write its tables.

spec.py reads a bench spec (configs/bench/*.yaml) and expands it into runs; runner.py launches
each run as a ``kd3 distill`` subprocess and caches its summary JSON; stats.py, tables.py and
plots.py turn the cached JSONs into results/<bench>.md, .json and charts.
"""
