"""``kd3 data``: list sources, build, show and diagnose pools, ingest an image folder."""
from __future__ import annotations

import argparse
from pathlib import Path

SHOWN_PAIRS = 20  # closest pairs printed; --out writes them all


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="data sources and web pools")
    data_sub = data.add_subparsers(dest="data_command", required=True, help="what to do with data (kd3 data SUBCOMMAND -h)")
    data_sub.add_parser("list", help="every labelled source and whether it is available here")

    for name, text in [("build", "build (or reuse) a benchmark pool and print its composition"),
                       ("show", "write a PNG grid of samples per pool source and style"),
                       ("diagnose", "how a teacher sees a pool: predicted classes, confidence, relevance scores"),
                       ("contamination", "pool images that copy evaluation images, and duplicates inside the pool")]:
        p = data_sub.add_parser(name, help=text)
        p.add_argument("pool", help="a builder name (fashion-wild, digits-wild) or a pool .npz file")
        p.add_argument("--size", type=int, default=20000, help="builder pools: number of images (default: 20000)")
        p.add_argument("--irrelevant-fraction", type=float, default=0.7,
                       help="builder pools: fraction of images from no teacher class (default: 0.7)")
        p.add_argument("--variant", default="default", choices=["default", "hard"],
                       help="builder pools: the image style mix (default: default)")
        sampled = "; pool files: the seed that samples the images shown" if name == "show" else ""
        p.add_argument("--seed", type=int, default=0, help=f"builder pools: the seed that draws the pool{sampled} (default: 0)")
        if name == "show":
            p.add_argument("--out", default=None, help="PNG path (default: <pool>-grid.png)")
            p.add_argument("--per-group", type=int, default=10, help="images shown per source and style (default: 10)")
        if name == "diagnose":
            p.add_argument("--teacher", required=True, help="teacher checkpoint (.pt from `kd3 train-teacher`)")
            p.add_argument("--out", default=None, help="output folder (default: <pool>-diagnosis)")
            p.add_argument("--score", action="append", default=[],
                           help="an extra relevance score to report, e.g. meanrank:energy+bn_mean_all (repeatable)")
            p.add_argument("--device", default="cpu", help="torch device that runs the teacher, e.g. cuda (default: cpu)")
        if name == "contamination":
            p.add_argument("--against", required=True, metavar="DATA",
                           help="the evaluation images: a SOURCE:SPLIT (e.g. fashion-mnist:test), or your own labelled "
                                "images (a folder of class sub-folders, a path,label .csv or an .npz)")
            p.add_argument("--out", default=None, help="CSV of every flagged pair and duplicate (default: none)")
            p.add_argument("--threshold", type=float, default=None,
                           help="copy distance in grey levels (default: kd3.data.contamination.THRESHOLD)")
            p.add_argument("--no-duplicates", action="store_true",
                           help="skip the pool × pool duplicate search (quadratic: hours on a CPU for 1M images)")
            p.add_argument("--device", default="cpu", help="torch device for the distance search, e.g. cuda (default: cpu)")

    p = data_sub.add_parser("ingest", help="decode an image folder or WebDataset tar shards into a pool")
    p.add_argument("directory", metavar="SOURCE",
                   help="an image folder, or img2dataset tar shards: 'crawl/{00000..00099}.tar' (quote the braces)")
    p.add_argument("--size", type=int, required=True, help="output side length in pixels")
    p.add_argument("--channels", type=int, choices=[1, 3], required=True, help="output channels: 1 (grey) or 3 (RGB)")
    p.add_argument("--out", required=True,
                   help="a pool .npz (held in memory) or a pool directory (written as it decodes; for big crawls)")
    p.add_argument("--workers", type=int, default=0, help="decoding processes (default: one per core)")
    p.add_argument("--allow-missing", action="store_true",
                   help="shards: skip the files a brace pattern names that do not exist (img2dataset output often has "
                        "gaps), counting them in the summary, instead of refusing")
    p.add_argument("--alpha", choices=["white", "black", "grey"], default="white",
                   help="the background transparent pixels (RGBA, LA, palette transparency) are composited onto: white "
                        "for images drawn on white pages, black for dark images on transparent backgrounds (icons, "
                        "glyphs), grey (128) for a mix; the default, white, is what kd3 always did, so existing pools are unchanged")
    data.set_defaults(func=run)


def _is_pool_file(args: argparse.Namespace) -> bool:
    return args.pool.endswith(".npz") or Path(args.pool).is_dir()


def _pool_from_args(args: argparse.Namespace):
    from kd3.data.pool import Pool
    from kd3.data.pools import load_or_build_pool
    from kd3.paths import cache_dir

    if _is_pool_file(args):
        return Pool.load(Path(args.pool))
    return load_or_build_pool(args.pool, cache_dir(), size=args.size, irrelevant_fraction=args.irrelevant_fraction,
                              variant=args.variant, seed=args.seed)


def _shuffled(pool, seed: int):
    """The pool in a seeded random order (a lazy view on disk): the grid shows each group's first
    images, and an ingested pool is in path order, so its first images are one folder's."""
    import numpy as np

    return pool.subset(np.random.default_rng(seed).permutation(len(pool)))


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
        save_pool_grid(_shuffled(pool, args.seed) if _is_pool_file(args) else pool, out, per_group=args.per_group)
        print(f"wrote {out} ({len(pool)} images)")
    elif args.data_command == "diagnose":
        _diagnose(args)
    elif args.data_command == "contamination":
        _contamination(args)
    elif args.data_command == "ingest":
        from kd3.data.ingest import ingest

        pool, report = ingest(args.directory, size=args.size, channels=args.channels, out=args.out,
                              workers=args.workers, show_progress=True, alpha=args.alpha,
                              allow_missing=args.allow_missing)
        print(f"wrote {args.out}: {len(pool)} images {tuple(pool.images.shape[1:])}; {report}")


def _pool_image(pool, index: int) -> str:
    """What names one pool image: its file when known (an ingested pool's source / style is
    "ingested / none" for every image), else its source / style."""
    if pool.paths is not None:
        return str(pool.paths[index])
    return f"{pool.source[index]} / {pool.style[index]}"


def _pool_title(args: argparse.Namespace) -> str:
    if _is_pool_file(args):
        return Path(args.pool).name
    return (f"{args.pool} (size {args.size}, {args.irrelevant_fraction:.0%} irrelevant, variant {args.variant}, "
            f"seed {args.seed})")


def _diagnose(args: argparse.Namespace) -> None:
    from kd3.diagnose import diagnose
    from kd3.diagnose.analysis import KEEP_FRACTIONS, group_summary
    from kd3.diagnose.report import auroc_columns, auroc_rows, cell
    from kd3.engine.logging import print_table
    from kd3.paths import cache_dir, expand

    pool = _pool_from_args(args)
    out = Path(args.out or f"{Path(args.pool).stem}-diagnosis")
    files = diagnose(pool, expand(args.teacher), out, cache_dir(), _pool_title(args), extra_scores=args.score,
                     device=args.device)
    d = files.diagnosis
    print_table("teacher on the pool, per source",
                ["source", "images", "relevant", "confidence", "entropy", "most predicted as", "share"],
                group_summary(d, "source"))
    if d.aurocs:
        kept = KEEP_FRACTIONS[0]
        columns = [c for c in auroc_columns(d) if not c.startswith("style:")]
        rows = [[row[0], *[cell(v) for v in row[1:len(columns) + 1]], cell(d.kept[name][kept].precision),
                 cell(d.kept[name][kept].percentile_precision)] for name, row in zip(d.aurocs, auroc_rows(d))]
        print_table("AUROC relevant vs irrelevant (higher = more relevant; per-style columns in the summary)",
                    ["score", *columns, f"P@{kept:.0%}", f"Pc@{kept:.0%}"], rows)
    print(f"wrote {files.markdown}, {files.html} and {len(files.images)} PNGs in {out}")


def _contamination(args: argparse.Namespace) -> None:
    from kd3.data import contamination
    from kd3.engine.logging import print_table

    pool = _pool_from_args(args)
    threshold = contamination.THRESHOLD if args.threshold is None else args.threshold
    report = contamination.pool_contamination(pool, args.against, threshold, duplicates=not args.no_duplicates,
                                              device=args.device, show_progress=True)
    s = report.summary()
    rows = [["pool images copying an evaluation image", s["flagged"], f"{100 * s['flagged'] / len(pool):.3f}"],
            ["  exact copies", s["exact"], f"{100 * s['exact'] / len(pool):.3f}"],
            ["  near copies", s["near"], f"{100 * s['near'] / len(pool):.3f}"]]
    if s["duplicate_groups"] is not None:
        rows += [["duplicate groups inside the pool", s["duplicate_groups"], ""],
                 ["  images in them", s["duplicate_images"], f"{100 * s['duplicate_images'] / len(pool):.3f}"]]
    print_table(f"{_pool_title(args)} against {args.against} ({s['eval_images']} images; copy distance ≤ "
                f"{threshold:g} grey levels)", ["", "images", "% of pool"], rows)
    pairs = list(report.pairs())
    if pairs:
        shown = sorted(pairs, key=lambda p: p.distance)[:SHOWN_PAIRS]
        print_table(f"closest copies ({len(shown)} of {len(pairs)} pairs)",
                    ["pool index", "path" if pool.paths is not None else "source / style", f"{args.against} index",
                     "kind", "distance"],
                    [[p.pool_index, _pool_image(pool, p.pool_index), p.eval_index, p.kind, f"{p.distance:.2f}"]
                     for p in shown])
    if args.out:
        path = report.write_csv(args.out, pool.source.astype(str), pool.style.astype(str), pool.paths)
        print(f"wrote {path}")
    if s["flagged"]:
        print(f"Train without them: kd3 distill CONFIG pool.drop_contaminated=true (against {args.against})")
