"""What a generation comparison shows: a table per set and variant (JSON rows are written by benchmark.py), and a
plot of speedup against tree budget beside each row's phase shares."""

from __future__ import annotations

from ddtree_mlx.engine.session import PHASES

LOSSLESS = {True: "yes", False: "NO", None: "n/a"}  # None: sampled, nothing to compare token for token


def print_table(rows: list[dict]) -> None:
    width = max([14] + [len(r["label"]) for r in rows])
    print(f"{'set':<10} {'variant':<{width}} {'tok/s':>16} {'vs mlx-lm':>16} {'vs ar':>5} {'tok/cyc':>7} "
          f"{'fast':>5} {'host':>5} {'cyc ms':>7} {'verify':>6} {'draft':>6} {'peak MB':>8} lossless")
    for r in rows:
        tps, speed, shares = r["tokens_per_second"], r["speedup_vs_mlx_lm"], r["phase_shares"]
        print(f"{r['set']:<10} {r['label']:<{width}} "
              f"{tps['median']:6.1f} ({tps['min']:.1f}-{tps['max']:.1f}) "
              f"{speed['median']:5.2f} ({speed['min']:.2f}-{speed['max']:.2f}) {r['speedup_vs_ar']['median']:5.2f} "
              f"{r['tokens_per_cycle']:7.2f} {r['fast_path_ratio']:5.2f} {r['host_overhead_share']:5.1%} "
              f"{r['cycle_ms']:7.1f} {shares['verify']:6.1%} {shares['draft']:6.1%} {r['peak_memory_mb']:8.0f} "
              f"{LOSSLESS[r['lossless']]}")
    for r in rows:
        if r["tree_budget"] == "auto":
            print(f"{r['set']:<10} {r['label']:<{width}} draft nodes per cycle: {r['tree_sizes']} (0: a plain step)")
    drafters = sorted({r["draft"] for r in rows if r["draft"]})
    print(f"# drafted by {', '.join(drafters)}" if drafters else "# nothing drafted")


def plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib")
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    plot_speedups(left, rows, matplotlib.ticker.ScalarFormatter())
    plot_phases(right, rows)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_speedups(axes, rows: list[dict], formatter) -> None:
    """Speedup vs mlx-lm per fixed tree budget, one line per set; DFlash and ddtree@auto as level lines."""
    for set_name in sorted({r["set"] for r in rows}):
        tree = sorted((r for r in rows if r["set"] == set_name and r["method"] == "ddtree"
                       and r["tree_budget"] != "auto"), key=lambda r: r["tree_budget"])
        line, = axes.plot([r["tree_budget"] for r in tree], [r["speedup_vs_mlx_lm"]["median"] for r in tree], "o-",
                          label=set_name)
        for method, budget, style in (("dflash", None, ":"), ("ddtree", "auto", "--")):
            for r in rows:
                if r["set"] == set_name and r["method"] == method and r["tree_budget"] == budget:
                    axes.axhline(r["speedup_vs_mlx_lm"]["median"], linestyle=style, color=line.get_color())
    axes.set_xscale("log", base=2)
    axes.xaxis.set_major_formatter(formatter)
    axes.set(xlabel="tree budget (dashed: auto; dotted: DFlash single path)", ylabel="speedup vs mlx-lm",
             title="DDTree")
    axes.legend()


def plot_phases(axes, rows: list[dict]) -> None:
    """Each row's decode time split into the engine's phases."""
    bottom = [0.0] * len(rows)
    for phase in PHASES:
        shares = [r["phase_shares"][phase] for r in rows]
        axes.bar(range(len(rows)), shares, bottom=bottom, label=phase)
        bottom = [b + s for b, s in zip(bottom, shares)]
    axes.set_xticks(range(len(rows)), [f"{r['set']} {r['label']}" for r in rows], rotation=90, fontsize=7)
    axes.set(ylabel="share of decode time", title="phase breakdown")
    axes.legend(fontsize=7)
