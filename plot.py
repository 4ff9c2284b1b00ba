"""A training run's metrics.jsonl as a PNG, with Pillow alone: the train and validation losses (log scale), tokens/s
and the learning rate against the step. train.py redraws out_dir/metrics.png at every log line; by hand:

    python plot.py out/tiny                      # out/tiny/metrics.jsonl -> out/tiny/metrics.png
    python plot.py run/metrics.jsonl --out a.png
"""
import argparse
import json
import math
import os

from PIL import Image, ImageDraw, ImageFont

PANELS = [  # (title, [(metrics key, colour)], log scale)
    ("loss", [("ce", (31, 119, 180)), ("mse", (255, 127, 14)), ("val_ce", (44, 160, 44)), ("val_mse", (214, 39, 40))],
     True),
    ("tokens/s", [("tokens_per_s", (148, 103, 189))], False),
    ("lr", [("lr", (140, 86, 75))], False),
]
WIDTH, PANEL_HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 800, 240, 70, 20, 28, 30  # pixels: the image, a panel, its margins


def read_metrics(path):
    """The rows of a metrics.jsonl; a step logged again after a resume keeps its last row."""
    rows = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows[row["step"]] = row
    return [rows[s] for s in sorted(rows)]


def ticks(lo, hi, log):
    """Round tick values in [lo, hi]: 1, 2, 3 and 5 times powers of ten (log scale), or 3 to 6 even steps."""
    if log:
        return [m * 10 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                for m in (1, 2, 3, 5) if lo <= m * 10 ** e <= hi]
    raw = (hi - lo) / 5
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if raw <= step * m)
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def plot_metrics(path, out):
    """Draw the metrics of `path` (metrics.jsonl) into the PNG `out`, one panel per PANELS entry."""
    rows = read_metrics(path)
    image = Image.new("RGB", (WIDTH, PANEL_HEIGHT * len(PANELS)), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=12)
    steps = [r["step"] for r in rows]
    x0, x1 = min(steps, default=0), max(steps, default=1)
    x_of = lambda s: LEFT + (s - x0) / ((x1 - x0) or 1) * (WIDTH - LEFT - RIGHT)
    for p, (title, series, log) in enumerate(PANELS):
        top, bottom = p * PANEL_HEIGHT + TOP, (p + 1) * PANEL_HEIGHT - BOTTOM
        draw.rectangle([LEFT, top, WIDTH - RIGHT, bottom], outline=(160, 160, 160))
        draw.text((LEFT, top - 16), title, fill="black", font=font)
        drawn = lambda v: isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 or not log)
        values = [r[k] for r in rows for k, _ in series if drawn(r.get(k))]
        if not values:
            continue
        lo, hi = min(values + ([] if log else [0])), max(values)  # a linear axis from 0
        if lo == hi:  # a flat line in the middle
            lo, hi = (lo / 2, hi * 2) if log else (lo - abs(lo) / 2 - 1e-12, hi + abs(hi) / 2 + 1e-12)
        scale = math.log10 if log else (lambda v: v)
        y_of = lambda v: bottom - (scale(v) - scale(lo)) / (scale(hi) - scale(lo)) * (bottom - top)
        for v in ticks(lo, hi, log):
            draw.line([LEFT - 4, y_of(v), LEFT, y_of(v)], fill="black")
            draw.text((LEFT - 6, y_of(v)), f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}", fill="black", font=font,
                      anchor="rm")
        for s in ticks(x0, x1, False) if x1 > x0 else [x0]:
            draw.line([x_of(s), bottom, x_of(s), bottom + 4], fill="black")
            draw.text((x_of(s), bottom + 6), f"{s:g}", fill="black", font=font, anchor="ma")
        legend = LEFT + 60
        for key, colour in series:
            points = [(x_of(r["step"]), y_of(r[key])) for r in rows if drawn(r.get(key))]
            if not points:
                continue
            draw.line(points, fill=colour, width=2)
            for x, y in points[:1] if len(points) == 1 else []:  # one row: a dot
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
            if len(series) > 1:
                draw.text((legend, top - 16), key, fill=colour, font=font)
                legend += int(draw.textlength(key, font=font)) + 16
    image.save(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Plot a training run's metrics.jsonl (losses, tokens/s, lr) as a PNG.")
    ap.add_argument("path", help="a run's out_dir or its metrics.jsonl")
    ap.add_argument("--out", help="the PNG (default: metrics.png next to metrics.jsonl)")
    args = ap.parse_args(argv)
    path = os.path.join(args.path, "metrics.jsonl") if os.path.isdir(args.path) else args.path
    if not os.path.isfile(path):
        raise SystemExit(f"no metrics file {path}")
    out = args.out or os.path.join(os.path.dirname(path), "metrics.png")
    plot_metrics(path, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
