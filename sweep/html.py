"""One self-contained interactive page of a study (`sweep pareto STUDY --html reports/index.html`).

The page embeds plotly.js (bundled by the `plotly` package: no network at view time) and the
study's points as JSON. Per device it draws Speed vs Top-1 and TTFT vs Top-1 with their fronts,
plus Top-1 vs Top-5; hovering a point shows its trial number, config diff, Top-1/Top-5 intervals,
KLD and speed / TTFT with their between-config intervals (as on the plots, sweep.plots: relative
to the device's knee; the model's absolute error, common to every config, stated once in the
subtitle); clicking a point or a table row shows its tt-metal decoder JSON and `--optimizations`
string with copy buttons. Filters: device, a minimum Top-1, and whether to show points that break
the study's constraints. The tables are the per-device front (as in the plots' index page) and
every trial.

Fronts are computed here in Python (sweep.pareto) over the feasible points; a minimum-Top-1 filter
commutes with every front drawn (a point that dominates one with Top-1 >= m also has Top-1 >= m),
so the page only hides points and never recomputes a front.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from sweep.objectives import OBJECTIVES, PER_DEVICE
from sweep.pareto import Analysis, Point, front_2d
from sweep.plots import C_FRONT, C_KNEE, C_NOISE, C_POINT, short_config
from sweep.report import calibration_text, decoder_json_of, display_name, optimizations_string, tt_problem


def _num(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _interval(p: Point, kind: str, device: str, reference: Point | None = None) -> list[float] | None:
    """A per-device interval the record may carry (e.g. `speed_ci = {"N150": (lo, hi)}`), else the
    between-config interval against `reference` (the device's knee), as on the plots
    (sweep.plots: the model's absolute error is common to every config and stated once)."""
    table = getattr(p.record, f"{kind}_ci", None)
    if isinstance(table, dict) and device in table:
        lo, hi = table[device]
        return [float(lo), float(hi)]
    from sweep.plots import _ci

    try:
        c = _ci(p, f"{kind}:{device}", reference) if reference is not None else None
    except KeyError:  # no figure for this device
        return None
    return None if c is None else [float(c[0]), float(c[1])]


def _bars_note(analysis: Analysis, refs: dict) -> str:
    from sweep.plots import absolute_text

    parts = []
    for d, ref in refs.items():
        if ref is None:
            continue
        a = [f"{OBJECTIVES[k].short} {absolute_text(f'{k}:{d}', ref).split(': ', 1)[-1]}" for k in PER_DEVICE
             if d in getattr(ref.record, k) and absolute_text(f"{k}:{d}", ref)]
        if a:
            parts.append(f"{d}: relative to trial {ref.number} (the knee); the model's absolute error, common to all "
                         f"configs: {', '.join(a)}")
    if not parts:
        return ""
    return ("Speed / TTFT bars: 90% between-config intervals (the error of the predicted ratio between two configs, "
            "engine.perf.calibrate.between_interval); " + "; ".join(parts) + ".")


def _point_data(p: Point, devices: list[str], refs: dict | None = None) -> dict:
    r = p.record
    return {
        "n": p.number, "diff": short_config(p.config), "config": p.config,
        "top1": r.top1, "top1_ci": list(r.top1_ci), "top5": r.top5, "top5_ci": list(r.top5_ci),
        "kld": _num(r.kld), "ppl": _num(r.ppl), "tokens": r.tokens, "feasible": p.feasible,
        "speed": {d: _num(r.speed.get(d)) for d in devices},
        "ttft": {d: _num(r.ttft.get(d)) for d in devices},
        "speed_ci": {d: _interval(p, "speed", d, (refs or {}).get(d)) for d in devices},
        "ttft_ci": {d: _interval(p, "ttft", d, (refs or {}).get(d)) for d in devices},
        "decoder_json": decoder_json_of(p), "optimizations": optimizations_string(p), "tt_problem": tt_problem(p),
        "reused_from": r.reused_from or "",
    }


def page_data(analysis: Analysis) -> dict:
    """Everything the page shows, as JSON-able data (also what the browser test checks against)."""
    info = analysis.info
    pts = [p for p in analysis.points if math.isfinite(p.record.top1)]
    devices = [d for d in info.devices]
    fronts: dict[str, dict] = {}
    by_n = {p.number: p for p in pts}
    refs = {d: by_n.get(analysis.devices[d].knee) if d in analysis.devices else None for d in devices}
    for d in devices:
        df = analysis.devices.get(d)
        usable = [p for p in pts if d in p.record.ttft]
        fronts[d] = {
            "speed": [p.number for p in front_2d([p for p in pts if d in p.record.speed], "top1", f"speed:{d}")],
            "ttft": [p.number for p in front_2d(usable, "top1", f"ttft:{d}")],
            "knee": df.knee if df else None,
            "within_noise": list(df.within_noise) if df else [],
            "noise_rule": df.noise_rule if df else "",
            "hypervolume": df.hypervolume if df else None,
        }
    return {
        "study": info.name, "model": info.model, "model_name": display_name(info.model), "devices": devices,
        "objectives": list(info.objectives), "front": list(analysis.front), "knee": analysis.knee,
        "hypervolume": analysis.hypervolume, "reference": analysis.reference_text(),
        "calibration": calibration_text(analysis),
        "constraints": [c.get("metric", "") + (f" >= {c['min']:g}" if c.get("min") is not None else "")
                        + (f" <= {c['max']:g}" if c.get("max") is not None else "")
                        for c in (info.spec.get("constraints") or []) if isinstance(c, dict)],
        "fronts": fronts,
        "top5_front": [p.number for p in front_2d([p for p in pts if p.feasible], "top5", "top1")],
        "points": [_point_data(p, devices, refs) for p in pts],
        "bars_note": _bars_note(analysis, refs),
        "colors": {"point": C_POINT, "front": C_FRONT, "noise": C_NOISE, "knee": C_KNEE},
    }


def render_page(analysis: Analysis) -> str:
    """The page's HTML text (plotly.js inline)."""
    from plotly.offline import get_plotlyjs

    data = page_data(analysis)
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")  # safe inside <script>
    title = f"{data['study']}: {data['model_name']} fronts"
    return (_TEMPLATE
            .replace("%TITLE%", html.escape(title))
            .replace("%PLOTLYJS%", get_plotlyjs())
            .replace("%DATA%", payload)
            .replace("%SCRIPT%", _SCRIPT))


def write_page(analysis: Analysis, path: str | Path) -> Path:
    """Write the page atomically (a reader never sees half a page)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_page(analysis), encoding="utf-8")
    tmp.replace(path)
    return path


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>%TITLE%</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#fff;border-bottom:1px solid #ddd;padding:12px 20px}
header h1{font-size:20px;margin:0 0 4px}
header p{margin:2px 0;font-size:13px;color:#555}
.bar{display:flex;flex-wrap:wrap;gap:18px;align-items:center;padding:10px 20px;background:#fff;border-bottom:1px solid #ddd;
 position:sticky;top:0;z-index:5;font-size:14px}
.bar label{display:flex;gap:6px;align-items:center}
.bar input[type=number]{width:64px}
.bar .count{color:#555}
main{padding:12px 20px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:14px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}
.plot{height:430px}
#detail{margin-top:14px}
#detail h2,.tables h2{font-size:16px;margin:4px 0 8px}
#detail .empty{color:#777;font-size:14px}
pre{background:#f4f4f4;border:1px solid #e2e2e2;border-radius:4px;padding:8px;max-height:260px;overflow:auto;font-size:12px;
 white-space:pre-wrap;overflow-wrap:anywhere}
button{font-size:13px;padding:3px 10px;cursor:pointer}
.row2{display:grid;grid-template-columns:1fr 1fr;gap:14px}
table{border-collapse:collapse;font-size:13px;width:100%}
th,td{border-bottom:1px solid #e6e6e6;padding:4px 6px;text-align:right;white-space:nowrap}
th{background:#f2f2f2;position:sticky;top:0}
td.cfg,th.cfg{text-align:left;white-space:normal;font-family:ui-monospace,Menlo,monospace;font-size:12px}
tr.sel{background:#fff3c4}
tr:hover{background:#eef4ff;cursor:pointer}
.tag{display:inline-block;border-radius:3px;padding:0 4px;font-size:11px;color:#fff;margin-left:3px}
.note{font-size:12px;color:#666;margin:6px 0}
.tables{margin-top:14px}
.scroll{max-height:460px;overflow:auto}
</style></head>
<body>
<header><h1 id="title"></h1><p id="subtitle"></p><p id="calib"></p></header>
<div class="bar">
 <label>Device <select id="device"></select></label>
 <label>Top-1 &ge; <input id="mintop1" type="number" min="0" max="100" step="0.5" value="0"> %</label>
 <label><input id="infeasible" type="checkbox" checked> show points outside the study's constraints</label>
 <span class="count" id="count"></span>
</div>
<main>
<div class="grid">
 <div class="card"><div id="plot-speed" class="plot"></div></div>
 <div class="card"><div id="plot-ttft" class="plot"></div></div>
 <div class="card"><div id="plot-top5" class="plot"></div></div>
 <div class="card" id="detail"><h2>Selected trial</h2><div class="empty" id="detail-empty">Click a point or a table row to see its tt-metal decoder JSON and --optimizations string.</div><div id="detail-body" hidden>
  <p id="detail-head"></p>
  <p><b>--optimizations</b> <button data-copy="opt">copy</button></p><pre id="opt"></pre>
  <p><b>decoder JSON</b> <button data-copy="json">copy</button></p><pre id="json"></pre>
 </div></div>
</div>
<div class="tables card"><h2 id="front-title"></h2><div class="note" id="front-note"></div><table id="front-table"></table></div>
<div class="tables card"><h2>Every trial</h2><div class="scroll"><table id="all-table"></table></div></div>
</main>
<script>%PLOTLYJS%</script>
<script>const DATA = %DATA%;</script>
<script>%SCRIPT%</script>
</body></html>
"""

_SCRIPT = r"""
"use strict";
const $ = (id) => document.getElementById(id);
const byN = new Map(DATA.points.map((p) => [p.n, p]));
let selected = null;
const f1 = (x) => (x === null || x === undefined ? "" : x.toFixed(1));
const fk = (x) => (x === null || x === undefined ? "" : x.toPrecision(3));
const ci = (c) => (c ? `[${c[0].toFixed(1)}, ${c[1].toFixed(1)}]` : "");

function hover(p, dev) {
  const s = p.speed[dev], t = p.ttft[dev];
  let h = `<b>trial ${p.n}</b>: ${p.diff}<br>Top-1 ${f1(p.top1)}% ${ci(p.top1_ci)}<br>Top-5 ${f1(p.top5)}% ${ci(p.top5_ci)}` +
          `<br>KLD ${fk(p.kld)} nats`;
  if (s !== null) h += `<br>${dev}: ${f1(s)} t/s/u` + (p.speed_ci[dev] ? ` ${ci(p.speed_ci[dev])}` : "");
  if (t !== null) h += `, TTFT ${f1(t)} ms` + (p.ttft_ci[dev] ? ` ${ci(p.ttft_ci[dev])}` : "");
  if (!p.feasible) h += "<br><i>outside the study's constraints</i>";
  return h + "<extra></extra>";
}

function visible() {
  const m = parseFloat($("mintop1").value) || 0, inf = $("infeasible").checked;
  return DATA.points.filter((p) => p.top1 >= m && (inf || p.feasible));
}

// one label per blob of points closer than ~1.6% of both axis ranges: "8, 12, 7, 5" (top to bottom)
function labels(pts, fx, fy) {
  const xs = pts.map(fx), ys = pts.map(fy);
  const dx = (Math.max(...xs) - Math.min(...xs)) * 0.016 || 1e-9, dy = (Math.max(...ys) - Math.min(...ys)) * 0.03 || 1e-9;
  const out = pts.map(() => ""), done = new Set();
  const order = pts.map((_, i) => i).sort((a, b) => ys[b] - ys[a]);
  for (const i of order) {
    if (done.has(i)) continue;
    const group = order.filter((j) => !done.has(j) && Math.abs(xs[j] - xs[i]) <= dx && Math.abs(ys[j] - ys[i]) <= dy);
    group.forEach((j) => done.add(j));
    out[i] = group.map((j) => pts[j].n).join(", ");
  }
  return out;
}

function traces(pts, xKey, yKey, dev, front, knee, noise) {
  const get = (k) => (p) => (k === "top1" || k === "top5" ? p[k] : p[k][dev]);
  const fx = get(xKey), fy = get(yKey);
  pts = pts.filter((p) => fx(p) !== null && fy(p) !== null);
  const err = (k, p) => (k === "top1" ? p.top1_ci : k === "top5" ? p.top5_ci : p[k + "_ci"][dev]);
  const lab = labels(pts, fx, fy);
  const labOf = new Map(pts.map((p, i) => [p.n, lab[i]]));
  const fset = new Set(front), nset = new Set(noise || []);
  const groups = [
    ["trial", (p) => p.feasible && !fset.has(p.n) && !nset.has(p.n), {color: DATA.colors.point, size: 8}],
    ["within noise of the front", (p) => p.feasible && nset.has(p.n) && !fset.has(p.n),
     {color: "white", size: 9, line: {color: DATA.colors.noise, width: 2}}],
    ["outside the constraints", (p) => !p.feasible, {color: "#888", size: 9, symbol: "x"}],
    ["Pareto front", (p) => fset.has(p.n), {color: DATA.colors.front, size: 10}],
  ];
  const out = [];
  for (const [name, keep, marker] of groups) {
    const g = pts.filter(keep);
    if (!g.length) continue;
    const ex = g.map((p) => err(xKey, p)), ey = g.map((p) => err(yKey, p));
    const bar = (e, v) => (e.every((c) => c) ? {type: "data", symmetric: false, array: e.map((c, i) => c[1] - v[i]),
      arrayminus: e.map((c, i) => v[i] - c[0]), color: "#9aa7b8", thickness: 1, width: 3} : undefined);
    const xv = g.map(fx), yv = g.map(fy);
    out.push({type: "scatter", mode: "markers+text", name, x: xv, y: yv, marker,
      // labels clear of the marker (and of the knee's ring)
      text: g.map((p) => (p.n === knee ? "\u2003\u2002" : "\u2009") + labOf.get(p.n)), textposition: "middle right",
      textfont: {size: 11, color: name === "Pareto front" ? DATA.colors.front : "#333"},
      error_x: bar(ex, xv), error_y: bar(ey, yv), customdata: g.map((p) => p.n),
      hovertemplate: g.map((p) => hover(p, dev)), cliponaxis: false});
  }
  const line = front.map((n) => byN.get(n)).filter((p) => p && pts.includes(p));
  line.sort((a, b) => fx(a) - fx(b));
  if (line.length > 1) out.unshift({type: "scatter", mode: "lines", name: "front line", x: line.map(fx), y: line.map(fy),
    line: {color: DATA.colors.front, width: 2}, hoverinfo: "skip", showlegend: false});
  const k = byN.get(knee);
  if (k && pts.includes(k)) out.push({type: "scatter", mode: "markers", name: "knee", x: [fx(k)], y: [fy(k)],
    marker: {size: 22, color: "rgba(0,0,0,0)", line: {color: DATA.colors.knee, width: 2.5}}, hoverinfo: "skip"});
  return out;
}

// axis range with room for the labels right of the points; a predicted speed/TTFT axis spans at
// least 2% of its level, so differences far below the performance model's resolution do not fill it
function range(vals, predicted, rightPad) {
  let lo = Math.min(...vals), hi = Math.max(...vals);
  if (predicted) { const mid = (lo + hi) / 2, need = 0.02 * Math.abs(mid); if (hi - lo < need) { lo = mid - need / 2; hi = mid + need / 2; } }
  const span = hi - lo || 1;
  return [lo - 0.06 * span, hi + (rightPad ? 0.12 : 0.06) * span];
}

function layout(title, xt, yt, tr, yPredicted) {
  const xs = [], ys = [];
  const ends = (v, e) => (e ? [...v.map((x, i) => x + e.array[i]), ...v.map((x, i) => x - e.arrayminus[i])] : v);
  for (const t of tr) if (t.mode !== "lines" && t.name !== "knee") { xs.push(...ends(t.x, t.error_x)); ys.push(...ends(t.y, t.error_y)); }
  const l = {title: {text: title, font: {size: 15}, x: 0.01, xanchor: "left"}, margin: {l: 62, r: 20, t: 52, b: 50},
    hovermode: "closest", xaxis: {title: {text: xt}, zeroline: false}, yaxis: {title: {text: yt}, zeroline: false},
    legend: {orientation: "h", y: -0.2, font: {size: 11}}, plot_bgcolor: "#fff"};
  if (xs.length) { l.xaxis.range = range(xs, false, true); l.yaxis.range = range(ys, yPredicted, false); }
  return l;
}

function draw() {
  const dev = $("device").value, pts = visible(), fr = DATA.fronts[dev];
  const opts = {displaylogo: false, responsive: true, modeBarButtonsToRemove: ["select2d", "lasso2d"]};
  const plots = [
    ["plot-speed", traces(pts, "top1", "speed", dev, fr.speed, fr.knee, fr.within_noise),
     `${DATA.model_name} on ${dev}: Speed vs Top-1`, "Top-1 (%)", "Speed (t/s/u, predicted)", true],
    ["plot-ttft", traces(pts, "top1", "ttft", dev, fr.ttft, null, []),
     `${DATA.model_name} on ${dev}: TTFT vs Top-1`, "Top-1 (%)", "TTFT (ms, predicted)", true],
    ["plot-top5", traces(pts, "top5", "top1", dev, DATA.top5_front, null, []),
     `${DATA.model_name}: Top-1 vs Top-5 (any device)`, "Top-5 (%)", "Top-1 (%)", false],
  ];
  for (const [id, tr, title, xt, yt, pred] of plots) Plotly.react(id, tr, layout(title, xt, yt, tr, pred), opts);
  for (const id of ["plot-speed", "plot-ttft", "plot-top5"]) {
    const el = $(id);
    if (!el._clickBound) {
      el.on("plotly_click", (ev) => { const n = ev.points[0].customdata; if (n !== undefined) select(n); });
      el._clickBound = true;
    }
  }
  $("count").textContent = `${pts.length} of ${DATA.points.length} trials shown`;
  tables(pts, dev);
}

function cell(v, cls) { const td = document.createElement("td"); td.textContent = v; if (cls) td.className = cls; return td; }
function head(table, cols) {
  table.innerHTML = "";
  const tr = document.createElement("tr");
  for (const c of cols) { const th = document.createElement("th"); th.textContent = c; if (c === "config (diff from defaults)") th.className = "cfg"; tr.appendChild(th); }
  table.appendChild(tr);
}
function row(table, p, values) {
  const tr = document.createElement("tr");
  tr.dataset.n = p.n;
  values.forEach((v, i) => tr.appendChild(cell(v, i === values.length - 1 ? "cfg" : "")));
  if (p.n === selected) tr.className = "sel";
  tr.addEventListener("click", () => select(p.n));
  table.appendChild(tr);
}

function tables(pts, dev) {
  const fr = DATA.fronts[dev], shown = new Set(pts.map((p) => p.n));
  $("front-title").textContent = `${dev}: Top-1 / speed front`;
  $("front-note").textContent = `Knee: trial ${fr.knee ?? "none"}. Within noise of the front (${fr.noise_rule}): ` +
    `${fr.within_noise.join(", ") || "none"}. Hypervolume ` +
    `${fr.hypervolume === null ? "" : fr.hypervolume.toPrecision(5)}. Study front over ${DATA.objectives.join(", ")}: ` +
    `trials ${DATA.front.join(", ")}.`;
  const ft = $("front-table");
  head(ft, ["#", "Top-1 (%) [95% CI]", "Top-5 (%)", "KLD", "Speed (t/s/u)", "TTFT (ms)", "config (diff from defaults)"]);
  for (const n of fr.speed) {
    const p = byN.get(n);
    if (!shown.has(n)) continue;
    row(ft, p, [n + (n === fr.knee ? " (knee)" : ""), `${f1(p.top1)} ${ci(p.top1_ci)}`, f1(p.top5), fk(p.kld),
      f1(p.speed[dev]), f1(p.ttft[dev]), p.diff]);
  }
  const at = $("all-table");
  const cols = ["#", "Top-1 (%) [95% CI]", "Top-5 (%) [95% CI]", "KLD"];
  for (const d of DATA.devices) cols.push(`${d} t/s/u`, `${d} TTFT ms`);
  cols.push("front", "config (diff from defaults)");
  head(at, cols);
  for (const p of pts) {
    const v = [p.n, `${f1(p.top1)} ${ci(p.top1_ci)}`, `${f1(p.top5)} ${ci(p.top5_ci)}`, fk(p.kld)];
    for (const d of DATA.devices) v.push(f1(p.speed[d]), f1(p.ttft[d]));
    const on = DATA.devices.filter((d) => DATA.fronts[d].speed.includes(p.n));
    v.push(on.join(" ") + (p.feasible ? "" : " (outside constraints)"), p.diff);
    row(at, p, v);
  }
}

function select(n) {
  const p = byN.get(n);
  if (!p) return;
  selected = n;
  $("detail-empty").hidden = true;
  $("detail-body").hidden = false;
  $("detail-head").textContent = `Trial ${n}: ${p.diff}` + (p.tt_problem ? ` (not runnable on tt-metal: ${p.tt_problem})` : "");
  $("opt").textContent = p.optimizations;
  $("json").textContent = p.decoder_json ? JSON.stringify(p.decoder_json, null, 1) : "(none: " + (p.tt_problem || "no decoder JSON") + ")";
  document.querySelectorAll("tr.sel").forEach((tr) => tr.classList.remove("sel"));
  document.querySelectorAll(`tr[data-n="${n}"]`).forEach((tr) => tr.classList.add("sel"));
}

function copy(id, button) {
  const text = $(id).textContent;
  const done = () => { button.textContent = "copied"; setTimeout(() => (button.textContent = "copy"), 1200); };
  const fallback = () => {
    const ta = document.createElement("textarea");
    ta.value = text; document.body.appendChild(ta); ta.select();
    try { document.execCommand("copy"); done(); } catch (e) { button.textContent = "select and copy by hand"; }
    ta.remove();
  };
  if (navigator.clipboard && window.isSecureContext) navigator.clipboard.writeText(text).then(done, fallback);
  else fallback();
}

function init() {
  $("title").textContent = `Study ${DATA.study}: ${DATA.model_name} (${DATA.model})`;
  $("subtitle").textContent = `${DATA.points.length} COMPLETE trials; devices ${DATA.devices.join(", ")}; objectives ` +
    `${DATA.objectives.join(", ")}` + (DATA.constraints.length ? `; constraints ${DATA.constraints.join(", ")}` : "") +
    `. Error bars: 95% Wilson intervals of Top-1 / Top-5. ${DATA.bars_note}`;
  $("calib").textContent = `Speed and TTFT are performance-model predictions, not measurements: ${DATA.calibration}`;
  const sel = $("device");
  for (const d of DATA.devices) { const o = document.createElement("option"); o.value = o.textContent = d; sel.appendChild(o); }
  for (const id of ["device", "mintop1", "infeasible"]) $(id).addEventListener("input", draw);
  document.querySelectorAll("button[data-copy]").forEach((b) => b.addEventListener("click", () => copy(b.dataset.copy, b)));
  draw();
}
init();
"""


__all__ = ["page_data", "render_page", "write_page"]
