"""Draws the panels of contrib/grafana/bsscihub.json as a PNG without Grafana: every panel's PromQL
is evaluated by a real Prometheus (its query_range API) and plotted with matplotlib on the same grid.

Not Grafana's own rendering: the same queries, layout, titles, legends and units, drawn by this script.
Needs matplotlib (`pip install matplotlib`) and a Prometheus that has scraped a hub; see screenshot.sh.

    python contrib/grafana/render.py --prometheus http://127.0.0.1:9090 --minutes 10 --out docs/img/dashboard.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

HERE = Path(__file__).parent
BACKGROUND, PANEL, TEXT, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"
COLOURS = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#705da0", "#37872d"]
ROW_HEIGHT = 0.42  # inches per Grafana grid unit (Grafana: 30 px)


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    url = f"{prometheus}/api/v1/query_range?" + urllib.parse.urlencode(
        {"query": expr, "start": start, "end": end, "step": step}
    )
    with urllib.request.urlopen(url, timeout=30) as response:
        doc = json.load(response)
    if doc.get("status") != "success":
        raise RuntimeError(f"{expr}: {doc}")
    return list(doc["data"]["result"])


def legend(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template) or str(labels)


def human(value: float, unit: str) -> str:
    if math.isnan(value):
        return "no data"
    if unit == "bytes":
        for suffix in ("B", "KiB", "MiB", "GiB"):
            if abs(value) < 1024 or suffix == "GiB":
                return f"{value:.3g} {suffix}"
            value /= 1024
    if unit == "s":
        return f"{value * 1000:.3g} ms" if value < 1 else f"{value:.3g} s"
    if unit == "reqps":
        return f"{value:.3g}/s"
    if unit == "percentunit":
        return f"{value * 100:.3g}%"
    return f"{value:.4g}"


def fetch(dashboard: dict[str, Any], prometheus: str, start: float, end: float, step: float,
          rate_interval: str) -> dict[str, list[tuple[str, list[list[float]]]]]:
    """Every panel's series by panel id: (legend, [[time, value], ...])."""
    found: dict[str, list[tuple[str, list[list[float]]]]] = {}
    for panel in dashboard["panels"]:
        series = found.setdefault(str(panel["id"]), [])
        for target in panel.get("targets", ()):
            expr = target["expr"].replace("$__rate_interval", rate_interval)
            for result in query_range(prometheus, expr, start, end, step):
                points = [[float(t), float(v)] for t, v in result["values"]]
                series.append((legend(target.get("legendFormat", ""), result["metric"]), points))
    return found


def draw(dashboard: dict[str, Any], data: dict[str, Any], minutes: float, out: Path) -> None:
    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    header = 0.6
    width, height = 24 * 0.72, rows * ROW_HEIGHT + header
    fig = plt.figure(figsize=(width, height), facecolor=BACKGROUND)
    fig.text(0.008, 1 - header / 2 / height, f"{dashboard['title']}  ·  last {minutes:g} minutes", color=TEXT,
             fontsize=14, va="center")
    inch_x, inch_y = 1 / width, 1 / height

    for panel in panels:
        grid = panel["gridPos"]
        left = grid["x"] / 24 + 0.004
        top = 1 - (header + grid["y"] * ROW_HEIGHT) * inch_y
        w = grid["w"] / 24 - 0.008
        h = (grid["h"] * ROW_HEIGHT - 0.1) * inch_y
        if panel["type"] == "row":
            fig.text(left, top - h / 2, panel["title"], color=TEXT, fontsize=12, weight="bold", va="center")
            continue
        fig.patches.append(Rectangle((left, top - h), w, h, transform=fig.transFigure, facecolor=PANEL,
                                     edgecolor=GRID, linewidth=0.8, zorder=-1))
        fig.text(left + 0.1 * inch_x, top - 0.18 * inch_y, panel["title"], color=TEXT, fontsize=9, va="center")
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "none")
        series = [(name, points) for name, points in data.get(str(panel["id"]), ()) if points]
        if panel["type"] == "stat":
            if panel.get("options", {}).get("textMode") == "name":
                text = ", ".join(name for name, _ in series) or "no data"
            else:
                text = human(sum(points[-1][1] for _, points in series), unit) if series else "no data"
            fig.text(left + w / 2, top - h / 2 - 0.1 * inch_y, text, color=COLOURS[0], fontsize=22, ha="center",
                     va="center")
            continue
        # Grafana's layout: title on top, the plot, the legend underneath.
        legend_rows = math.ceil(len(series) / (3 if grid["w"] >= 8 else 2)) if series else 0
        legend_h = (0.25 + 0.17 * legend_rows) * inch_y
        frame = fig.add_axes((left + 0.62 * inch_x, top - h + legend_h + 0.25 * inch_y,
                              w - 0.75 * inch_x, h - legend_h - 0.6 * inch_y), facecolor=PANEL)
        for side in frame.spines.values():
            side.set_visible(False)
        for i, (name, points) in enumerate(series):
            frame.plot([datetime.datetime.fromtimestamp(t, datetime.UTC) for t, _ in points],
                       [v for _, v in points], color=COLOURS[i % len(COLOURS)], linewidth=1.2, label=name)
        frame.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=3, maxticks=7 if grid["w"] >= 8 else 4))
        frame.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))
        frame.yaxis.set_major_locator(plt.MaxNLocator(5))
        frame.tick_params(colors=TEXT, labelsize=7, length=0)
        frame.grid(color=GRID, linewidth=0.5)
        frame.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _, u=unit: human(v, u)))
        if series:
            frame.legend(loc="upper left", bbox_to_anchor=(0.0, -0.1), fontsize=7, frameon=False, labelcolor=TEXT,
                         ncol=3 if grid["w"] >= 8 else 2, handlelength=1.2, columnspacing=1.2)
        else:
            frame.text(0.5, 0.5, "no data", color=TEXT, ha="center", transform=frame.transAxes)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90, facecolor=BACKGROUND)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--dashboard", type=Path, default=HERE / "bsscihub.json")
    parser.add_argument("--minutes", type=float, default=10.0, help="time range ending now")
    parser.add_argument("--step", type=float, default=5.0, help="seconds between points")
    parser.add_argument("--rate-interval", default="30s", help="what $__rate_interval stands for")
    parser.add_argument("--out", type=Path, default=Path("dashboard.png"))
    parser.add_argument("--data", type=Path, help="keep the query results here (drawn from it if it exists)")
    args = parser.parse_args()
    dashboard = json.loads(args.dashboard.read_text())
    if args.data is not None and args.data.exists():
        data = json.loads(args.data.read_text())
    else:
        end = time.time()
        data = fetch(dashboard, args.prometheus, end - args.minutes * 60, end, args.step, args.rate_interval)
        if args.data is not None:
            args.data.write_text(json.dumps(data))
    draw(dashboard, data, args.minutes, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
