"""``kd3 data``: list sources, build and show pools, ingest an image folder."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="data sources and web pools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    data_sub.add_parser("list", help="every labelled source and whether it is available here")

    for name, text in [("build", "build (or reuse) a benchmark pool and print its composition"),
                       ("show", "write a PNG grid of samples per pool source and style")]:
        p = data_sub.add_parser(name, help=text)
        p.add_argument("pool", help="a builder name (fashion-wild, digits-wild) or a pool .npz file")
        p.add_argument("--size", type=int, default=20000)
        p.add_argument("--irrelevant-fraction", type=float, default=0.7)
        p.add_argument("--variant", default="default", choices=["default", "hard"])
        p.add_argument("--seed", type=int, default=0)
        if name == "show":
            p.add_argument("--out", default=None, help="PNG path (default: <pool>-grid.png)")
            p.add_argument("--per-group", type=int, default=10)

    p = data_sub.add_parser("ingest", help="decode an image folder into a pool .npz")
    p.add_argument("directory")
    p.add_argument("--size", type=int, required=True, help="output side length in pixels")
    p.add_argument("--channels", type=int, choices=[1, 3], required=True)
    p.add_argument("--out", required=True, help="where to write the pool .npz")
    data.set_defaults(func=run)


def _pool_from_args(args: argparse.Namespace):
    from kd3.data.pool import Pool
    from kd3.data.pools import load_or_build_pool
    from kd3.paths import cache_dir

    if args.pool.endswith(".npz"):
        return Pool.load(Path(args.pool))
    return load_or_build_pool(args.pool, cache_dir(), size=args.size, irrelevant_fraction=args.irrelevant_fraction,
                              variant=args.variant, seed=args.seed)


def _composition_rows(pool) -> list[list]:
    import numpy as np

    keys = np.char.add(np.char.add(pool.source.astype(str), " / "), pool.style.astype(str))
    names, counts = np.unique(keys, return_counts=True)
    return [[str(n), int(c), f"{100 * c / len(pool):.1f}"] for n, c in zip(names, counts)]


def run(args: argparse.Namespace) -> None:
    from kd3.engine.logging import print_table

    if args.data_command == "list":
        from kd3.data.sources import list_sources

        rows = [[s.name, "yes" if s.available else "no", s.detail] for s in list_sources()]
        print_table("kd3 data sources", ["source", "available", "where / how to get it"], rows)
    elif args.data_command == "build":
        pool = _pool_from_args(args)
        print_table(f"{args.pool}: {len(pool)} images", ["source / style", "images", "%"], _composition_rows(pool))
    elif args.data_command == "show":
        from kd3.data.grid import save_pool_grid

        pool = _pool_from_args(args)
        out = Path(args.out or f"{Path(args.pool).stem}-grid.png")
        save_pool_grid(pool, out, per_group=args.per_group)
        print(f"wrote {out} ({len(pool)} images)")
    elif args.data_command == "ingest":
        from kd3.data.ingest import ingest_folder

        pool, report = ingest_folder(Path(args.directory), size=args.size, channels=args.channels)
        out = Path(args.out)
        pool.save(out)
        print(f"wrote {out}: {len(pool)} images {tuple(pool.images.shape[1:])}; {report}")
