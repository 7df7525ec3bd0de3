"""Turn pytest-benchmark JSON into a Markdown table of ratios and a PNG bar chart.

    python benchmarks/report.py RESULTS.json [MORE.json ...] --out-dir DIR [--ours fastgan] [--title T]

Writes DIR/report.md and DIR/report.png. Works on the JSON of any bench_*.py suite: benchmarks are
grouped by their pytest-benchmark group; within a group, each benchmark is one contender, named by
``extra_info["contender"]`` (else its parameters, else its test name). For each group the table gives
every contender's median time per step, IQR, peak memory and compile time (when the benchmark recorded
them), and the speed-up of ``--ours`` over it: contender time / our time (> 1: ours is faster).
Where a benchmark recorded ``limit_s`` (a floor measured in the same run: matmul + conv FLOPs over the
measured matmul rate for steps, bytes moved over the measured copy bandwidth for optimizer steps; its
``limit_basis`` names which), a "limit" row says how close each contender is to the hardware.

Times: ``stats.median`` / ``extra_info["steps_per_round"]`` (pytest-benchmark's stats are per call;
step benchmarks may run several steps per call), or ``extra_info["event_median_s"]`` (CUDA events)
when present.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_OURS = "fastgan"


@dataclass
class Entry:
    """One contender's result in one group."""
    contender: str
    median_s: float
    iqr_s: float
    rounds: int
    peak_memory_bytes: int | None = None
    compile_time_s: float | None = None
    limit_s: float | None = None
    limit_basis: str = "FLOPs / matmul rate"
    timer: str = "wall"        # "wall" (pytest-benchmark) or "cuda events"
    paired_median_s: float | None = None   # from interleaved rounds with the group's other contenders
    speedup_quartiles: dict | None = None  # ours only: {contender: [q1, median, q3]} of per-round ratios


@dataclass
class Group:
    name: str
    entries: list[Entry] = field(default_factory=list)

    def entry(self, contender: str) -> Entry | None:
        return next((e for e in self.entries if e.contender == contender), None)

    @property
    def paired(self) -> bool:
        """Whether every contender has a paired (interleaved) time: ratios then use those."""
        return bool(self.entries) and all(e.paired_median_s is not None for e in self.entries)

    def time(self, entry: Entry) -> float:
        """The time ratios are computed from: the paired median when the whole group has one."""
        return entry.paired_median_s if self.paired else entry.median_s

    @property
    def limit_s(self) -> float | None:
        limits = [e.limit_s for e in self.entries if e.limit_s is not None]
        return max(limits) if limits else None

    @property
    def limit_basis(self) -> str:
        return next((e.limit_basis for e in self.entries if e.limit_s is not None), "")


def contender_name(bench: dict) -> str:
    extra = bench.get("extra_info") or {}
    if extra.get("contender"):
        return str(extra["contender"])
    params = bench.get("params") or {}
    if params:
        return "-".join(str(v) for v in params.values())
    return bench.get("name", "?")


def load_groups(paths: list[str | Path]) -> list[Group]:
    """Groups (in first-seen order) from one or more pytest-benchmark JSON files."""
    groups: dict[str, Group] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        for bench in data.get("benchmarks", []):
            stats = bench.get("stats")
            if not stats:
                continue
            extra = bench.get("extra_info") or {}
            steps = extra.get("steps_per_round") or 1
            if extra.get("event_median_s") is not None:
                median, timer = float(extra["event_median_s"]), "cuda events"
            else:
                median, timer = float(stats["median"]) / steps, "wall"
            entry = Entry(
                contender=contender_name(bench),
                median_s=median,
                iqr_s=float(stats.get("iqr", 0.0)) / steps,
                rounds=int(stats.get("rounds", 0)),
                peak_memory_bytes=extra.get("peak_memory_bytes"),
                compile_time_s=extra.get("compile_time_s"),
                limit_s=extra.get("limit_s"),
                limit_basis=extra.get("limit_basis") or "FLOPs / matmul rate",
                timer=timer,
                paired_median_s=extra.get("paired_median_s"),
                speedup_quartiles=extra.get("fastgan_paired_speedup_quartiles"),
            )
            group = groups.setdefault(bench.get("group") or bench.get("name", "?"),
                                      Group(bench.get("group") or bench.get("name", "?")))
            if group.entry(entry.contender) is not None:
                raise ValueError(f"group {group.name!r} has contender {entry.contender!r} twice "
                                 f"(from {path}); give each benchmark of a group its own contender name")
            group.entries.append(entry)
    return list(groups.values())


def our_entry(group: Group, ours: str = DEFAULT_OURS) -> Entry | None:
    """Our contender in ``group``: the one named ``ours``, else the only one whose name starts with it
    (e.g. "fastgan+ema" in a group comparing EMA updates)."""
    exact = group.entry(ours)
    if exact is not None:
        return exact
    prefixed = [e for e in group.entries if e.contender.startswith(ours)]
    return prefixed[0] if len(prefixed) == 1 else None


def speedups(groups: list[Group], ours: str = DEFAULT_OURS) -> dict[str, dict[str, float]]:
    """{group: {contender: contender's median / our median}} for groups where ``ours`` ran."""
    out = {}
    for group in groups:
        mine = our_entry(group, ours)
        if mine is None or group.time(mine) <= 0:
            continue
        out[group.name] = {e.contender: group.time(e) / group.time(mine) for e in group.entries if e is not mine}
    return out


def _time(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} µs"


def _mib(nbytes: int | None) -> str:
    return "–" if nbytes is None else f"{nbytes / 2 ** 20:.1f}"


def _ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def markdown(groups: list[Group], ours: str = DEFAULT_OURS, title: str | None = None,
             machine: str | None = None, chart: str | None = None) -> str:
    """The report: a summary of our speed-ups per group, then one table per group."""
    ratios = speedups(groups, ours)
    lines = [f"# {title or 'Benchmark report'}", ""]
    if machine:
        lines += [f"Machine: {machine}", ""]
    lines += [f"Speed-up of **{ours}** = contender's median time / {ours}'s median time (> 1: {ours} is "
              "faster), from paired medians where a group has them (all its contenders timed in interleaved "
              "rounds, so load drift on a shared machine hits all alike), else from each benchmark's own "
              "median (contenders timed one after another). \"limit\" = a training step's matmul + convolution FLOPs / the "
              "device's fastest matmul rate measured in the same run (fp32; on CUDA fp32 or TF32, whichever is "
              "faster), or an optimizer step's fewest bytes moved / the copy bandwidth measured in the same run "
              "(its row says which); \"% of limit\" = "
              "limit / time. \"rounds: a–b\" = the middle half (25th–75th percentile) of the per-round speed-ups "
              "of the paired rounds. Peak memory: see each benchmark's memory_method in the JSON.", ""]
    if chart:
        lines += [f"![speed-ups]({chart})", ""]
    others: list[str] = []
    for group in groups:
        mine = our_entry(group, ours)
        for e in group.entries:
            if e is not mine and e.contender not in others:
                others.append(e.contender)
    if ratios:
        has_limit = any(g.limit_s for g in groups if g.name in ratios)
        header = ["group", f"{ours} time"] + [f"vs {o}" for o in others] + ([f"{ours} % of limit"] if has_limit else [])
        lines += ["## Summary", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for group in groups:
            if group.name not in ratios:
                continue
            mine = our_entry(group, ours)
            row = [group.name + (" (paired)" if group.paired else ""), _time(group.time(mine))] + \
                [_ratio(ratios[group.name].get(o)) for o in others]
            if has_limit:
                row.append(f"{100 * group.limit_s / group.time(mine):.1f}%" if group.limit_s else "–")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += ["## Details", ""]
    for group in groups:
        mine = our_entry(group, ours)
        lines += [f"### {group.name}", "",
                  f"| contender | median, paired | median, alone | IQR, alone | rounds | peak memory (MiB) | compile "
                  f"| {ours} speed-up | % of limit |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for e in group.entries:
            speed = "1.00× (ours)" if e is mine else _ratio(ratios.get(group.name, {}).get(e.contender))
            spread = (mine.speedup_quartiles or {}).get(e.contender) if mine is not None else None
            if spread and group.paired:
                speed += f" (rounds: {spread[0]:.2f}–{spread[2]:.2f})"
            of_limit = f"{100 * group.limit_s / group.time(e):.1f}%" if group.limit_s else "–"
            timer = " (CUDA events)" if e.timer == "cuda events" else ""
            lines.append(f"| {e.contender} | {_time(e.paired_median_s)} | {_time(e.median_s)}{timer} | "
                         f"{_time(e.iqr_s)} | {e.rounds} | {_mib(e.peak_memory_bytes)} | {_time(e.compile_time_s)} | "
                         f"{speed} | {of_limit} |")
        if group.limit_s:
            lines.append(f"| limit ({group.limit_basis}) | {_time(group.limit_s)} | | | | | | – | 100% |")
        lines.append("")
    return "\n".join(lines)


def bar_chart(groups: list[Group], path: str | Path, ours: str = DEFAULT_OURS, title: str | None = None) -> bool:
    """PNG: per group, each contender's time relative to ours (log scale), the limit hatched.
    Returns False (and writes nothing) when no group has our contender."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [g for g in groups if our_entry(g, ours) is not None]
    if not shown:
        return False
    names: list[str] = []
    for g in shown:
        for e in g.entries:
            if e.contender not in names:
                names.append(e.contender)
    has_limit = any(g.limit_s for g in shown)
    series = names + (["limit"] if has_limit else [])
    height = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(9, 0.5 + 0.22 * len(series) * len(shown) + 0.6))
    cmap = plt.get_cmap("tab10")
    for j, name in enumerate(series):
        ys, xs = [], []
        for i, g in enumerate(shown):
            mine = g.time(our_entry(g, ours))
            t = g.limit_s if name == "limit" else (g.time(g.entry(name)) if g.entry(name) else None)
            if t:
                ys.append(i + (j - (len(series) - 1) / 2) * height)
                xs.append(t / mine)
        ax.barh(ys, xs, height=height * 0.95, label=name, color="white" if name == "limit" else cmap(j % 10),
                edgecolor="black" if name == "limit" else None, hatch="//" if name == "limit" else None)
        for y, x in zip(ys, xs):
            ax.annotate(f"{x:.2f}", (x, y), xytext=(2, 0), textcoords="offset points", va="center", fontsize=7)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(shown)))
    ax.set_yticklabels([g.name for g in shown], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"time per step relative to {ours} (log scale; > 1: {ours} is faster)")
    ax.set_title(title or f"{ours} vs other contenders")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _machine_line(paths: list[str | Path]) -> str | None:
    for path in paths:
        info = json.loads(Path(path).read_text()).get("machine_info", {}).get("fastgan_machine")
        if info:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from machine import short_name
            return (f"{short_name(info)}, {info.get('torch_threads')} torch threads; "
                    f"torch {info.get('torch')}, triton {info.get('triton')}, "
                    f"fastgan {info.get('fastgan')} ({(info.get('fastgan_commit') or '?')[:10]}), "
                    f"load average {info.get('load_average_1_5_15min')}, {info.get('date_utc')}")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s) (--benchmark-json)")
    parser.add_argument("--out-dir", required=True, help="folder for report.md and report.png")
    parser.add_argument("--ours", default=DEFAULT_OURS, help="the contender whose speed-up is reported")
    parser.add_argument("--title", default=None)
    parser.add_argument("--name", default="report", help="file stem of the outputs (default: report)")
    args = parser.parse_args(argv)
    groups = load_groups(args.json)
    if not groups:
        print(f"report.py: no benchmark results in {args.json} (was the run made with --benchmark-enable?)",
              file=sys.stderr)
        return 1
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{args.name}.png"
    has_chart = bar_chart(groups, png, args.ours, args.title)
    text = markdown(groups, args.ours, args.title, _machine_line(args.json), png.name if has_chart else None)
    (out / f"{args.name}.md").write_text(text + "\n")
    print(f"wrote {out / (args.name + '.md')}" + (f" and {png}" if has_chart else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
