"""Bench specs (configs/bench/<name>.yaml) and their expansion into (group, row, seed) runs.

A spec lists rows (a method config plus overrides), the seeds, the baseline row that paired
differences are taken against, and two pool variations of some rows: the irrelevant-fraction
sweep and the ``hard`` style variant. Each variation is a *group* of runs with its own cache
folder, so the main table, every sweep point and the hard variant never overwrite each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

from kd3.config import ConfigError, load_config

# What each kind of row uses besides the web pool (a column of the tables, so readers can tell
# methods from references at a glance).
KINDS = {"method": "", "reference": "original data", "oracle": "provenance", "teacher": "original data"}
MAIN_GROUP = "runs"
SPEC_DIR = Path("configs/bench")


@dataclass
class RowSpec:
    name: str = ""
    config: str = ""  # a `kd3 distill` config (for the teacher row: any config naming the teacher)
    kind: str = "method"  # method | reference (original data) | oracle (provenance) | teacher (not trained)
    overrides: list[str] = field(default_factory=list)


@dataclass
class SweepSpec:
    rows: list[str] = field(default_factory=list)
    key: str = "pool.irrelevant_fraction"
    values: list[float] = field(default_factory=list)


@dataclass
class VariantSpec:
    rows: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)


@dataclass
class ComparisonSpec:
    """A paired difference worth its own line besides the one to the baseline: ``row`` − ``vs``."""

    row: str = ""
    vs: str = ""


@dataclass
class BenchSpec:
    name: str = ""
    rows: list[RowSpec] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    baseline: str = "blind_kd"
    results_dir: str = "results"  # tables land here; per-run JSONs under <results_dir>/<name>/
    runs_dir: str = "runs/bench"  # training run directories (checkpoints): <runs_dir>/<name>/
    sweep: SweepSpec | None = None
    hard: VariantSpec | None = None
    comparisons: list[ComparisonSpec] = field(default_factory=list)

    @property
    def results_root(self) -> Path:
        return Path(self.results_dir) / self.name

    @property
    def runs_root(self) -> Path:
        return Path(self.runs_dir) / self.name

    def row(self, name: str) -> RowSpec:
        for row in self.rows:
            if row.name == name:
                return row
        raise ConfigError(f"bench {self.name}: no row {name!r}; rows: {', '.join(r.name for r in self.rows)}")

    @property
    def teacher_row(self) -> RowSpec:
        return next(r for r in self.rows if r.kind == "teacher")


@dataclass(frozen=True)
class Group:
    """Runs sharing one pool variation: ``runs`` (the main table), ``sweep/<fraction>``, ``hard``."""

    name: str
    rows: tuple[str, ...]
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Run:
    bench: str
    group: str
    row: str
    kind: str
    seed: int
    config: str
    overrides: tuple[str, ...]  # everything passed to `kd3 distill` after the config path
    record: Path  # the cached summary JSON; it existing means the run is finished
    output_dir: Path  # holds this run's kd3 run directory (one per attempt without a checkpoint)

    @property
    def label(self) -> str:
        where = "" if self.group == MAIN_GROUP else f"{self.group}/"
        return f"{where}{self.row} seed {self.seed}"


def spec_path(name: str) -> Path:
    """A spec file path, or a bench name looked up in configs/bench/."""
    path = Path(name)
    return path if path.suffix in (".yaml", ".yml") else SPEC_DIR / f"{name}.yaml"


def load_spec(name: str, overrides: list[str] = ()) -> BenchSpec:
    spec = load_config(BenchSpec, spec_path(name), overrides)
    _check(spec)
    return spec


def _check(spec: BenchSpec) -> None:
    names = [r.name for r in spec.rows]
    if not spec.name or len(set(names)) != len(names) or not all(names):
        raise ConfigError(f"bench spec needs a name and unique, non-empty row names (got {names})")
    for row in spec.rows:
        if row.kind not in KINDS:
            raise ConfigError(f"bench {spec.name}, row {row.name}: kind {row.kind!r}; valid: {', '.join(KINDS)}")
        if not Path(row.config).is_file():
            raise ConfigError(f"bench {spec.name}, row {row.name}: config {row.config} does not exist")
    if [r.kind for r in spec.rows].count("teacher") != 1:
        raise ConfigError(f"bench {spec.name}: exactly one row must have kind: teacher")
    if spec.row(spec.baseline).kind == "teacher":
        raise ConfigError(f"bench {spec.name}: the baseline must be a trained row")
    for pair in spec.comparisons:
        if spec.row(pair.row).kind == "teacher" or spec.row(pair.vs).kind == "teacher" or pair.row == pair.vs:
            raise ConfigError(f"bench {spec.name}: comparison {pair.row} vs {pair.vs} needs two different trained rows")
    for variant in (spec.sweep, spec.hard):
        for name in variant.rows if variant else ():
            if spec.row(name).kind == "teacher":
                raise ConfigError(f"bench {spec.name}: the teacher is not trained, so it has no pool variants")


def groups(spec: BenchSpec, sweep: bool = False, hard: bool = False,
           points: list[float] | None = None) -> list[Group]:
    """The main table's group, or the sweep's (only its ``points``, when given) and/or the hard variant's groups."""
    if not (sweep or hard):
        return [Group(MAIN_GROUP, tuple(r.name for r in spec.rows if r.kind != "teacher"))]
    chosen = []
    if sweep:
        if spec.sweep is None:
            raise ConfigError(f"bench {spec.name} defines no sweep")
        unknown = [value for value in points or () if value not in spec.sweep.values]
        if unknown:
            raise ConfigError(f"bench {spec.name}: sweep point(s) {', '.join(f'{v:g}' for v in unknown)} not among "
                              f"the spec's {spec.sweep.key} values ({', '.join(f'{v:g}' for v in spec.sweep.values)})")
        chosen += [Group(sweep_group(value), tuple(spec.sweep.rows), (f"{spec.sweep.key}={value}",))
                   for value in spec.sweep.values if points is None or value in points]
    if hard:
        if spec.hard is None:
            raise ConfigError(f"bench {spec.name} defines no hard variant")
        chosen.append(Group("hard", tuple(spec.hard.rows), tuple(spec.hard.overrides)))
    return chosen


def all_groups(spec: BenchSpec) -> list[Group]:
    """The main table's group and every pool variation the spec defines."""
    has_variants = spec.sweep is not None or spec.hard is not None
    return groups(spec) + (groups(spec, sweep=spec.sweep is not None, hard=spec.hard is not None) if has_variants else [])


def sweep_group(value: float) -> str:
    return f"sweep/{value:g}"


def plan_runs(spec: BenchSpec, chosen: list[Group], rows: list[str] | None = None,
              seeds: list[int] | None = None) -> list[Run]:
    """Every (group, row, seed) to have a result for; ``rows`` limits the rows (each must be in a group)."""
    planned = {name for group in chosen for name in group.rows} | {spec.teacher_row.name}
    unknown = [name for name in rows or () if name not in planned]
    if unknown:
        raise ConfigError(f"bench {spec.name}: {', '.join(unknown)} not among these runs' rows "
                          f"({', '.join(sorted(planned))})")
    runs = []
    # Seed-major: a bench stopped halfway has whole seeds of every row, so its tables already read.
    for seed, group in product(seeds if seeds is not None else spec.seeds, chosen):
        for row in (spec.row(name) for name in group.rows if not rows or name in rows):
            output_dir = spec.runs_root / group.name / row.name / f"seed{seed}"
            # pool.seed is left alone: every seed distils from the same pool, only training varies.
            overrides = (*row.overrides, *group.overrides, f"train.seed={seed}", "train.threads=1",
                         "progress=false", f"output_dir={output_dir}")
            runs.append(Run(bench=spec.name, group=group.name, row=row.name, kind=row.kind, seed=seed,
                            config=row.config, overrides=overrides,
                            record=spec.results_root / group.name / row.name / f"seed{seed}.json",
                            output_dir=output_dir))
    return runs
