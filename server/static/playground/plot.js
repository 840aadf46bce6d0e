// A tiny SVG line/scatter chart: points joined in order, each with a label and a tooltip.

const NS = "http://www.w3.org/2000/svg";
const W = 380, H = 250, PAD = { l: 56, r: 24, t: 34, b: 40 };

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

const fmt = (v) => (Math.abs(v) >= 1000 || (Math.abs(v) < 0.01 && v !== 0)
  ? v.toExponential(1) : String(+v.toPrecision(3)));

function scale(values, log, lo, hi) {
  const t = (v) => (log ? Math.log10(v) : v);
  let min = Math.min(...values.map(t)), max = Math.max(...values.map(t));
  if (min === max) { min -= 0.5; max += 0.5; }
  const map = (v) => lo + ((t(v) - min) / (max - min)) * (hi - lo);
  const ticks = [0, 0.5, 1].map((f) => (log ? 10 ** (min + f * (max - min)) : min + f * (max - min)));
  return { map, ticks };
}

/** points: [{x, y, label}] (non-finite ones are skipped; log axes also skip values <= 0). */
export function chart({ points, title, xLabel, yLabel, logX = false, logY = false }) {
  const ok = points.filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y)
    && (!logX || p.x > 0) && (!logY || p.y > 0));
  const root = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img" });
  root.append(svg("text", { x: W / 2, y: 16, "text-anchor": "middle", "font-weight": "bold",
    "font-size": 13 }, title));
  if (!ok.length) {
    root.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no data"));
    return root;
  }
  const sx = scale(ok.map((p) => p.x), logX, PAD.l, W - PAD.r);
  const sy = scale(ok.map((p) => p.y), logY, H - PAD.b, PAD.t);
  root.append(svg("line", { x1: PAD.l, y1: H - PAD.b, x2: W - PAD.r, y2: H - PAD.b, stroke: "#888" }));
  root.append(svg("line", { x1: PAD.l, y1: PAD.t, x2: PAD.l, y2: H - PAD.b, stroke: "#888" }));
  for (const t of sx.ticks) {
    root.append(svg("text", { x: sx.map(t), y: H - PAD.b + 14, "text-anchor": "middle",
      "font-size": 10 }, fmt(t)));
  }
  for (const t of sy.ticks) {
    root.append(svg("text", { x: PAD.l - 4, y: sy.map(t) + 3, "text-anchor": "end",
      "font-size": 10 }, fmt(t)));
  }
  root.append(svg("text", { x: (PAD.l + W - PAD.r) / 2, y: H - 6, "text-anchor": "middle",
    "font-size": 11 }, xLabel + (logX ? " (log)" : "")));
  root.append(svg("text", { x: 12, y: (PAD.t + H - PAD.b) / 2, "text-anchor": "middle",
    "font-size": 11, transform: `rotate(-90 12 ${(PAD.t + H - PAD.b) / 2})` },
  yLabel + (logY ? " (log)" : "")));
  root.append(svg("polyline", { fill: "none", stroke: "#2456c9", "stroke-width": 1.5,
    points: ok.map((p) => `${sx.map(p.x)},${sy.map(p.y)}`).join(" ") }));
  for (const p of ok) {
    const dot = svg("circle", { cx: sx.map(p.x), cy: sy.map(p.y), r: 4, fill: "#2456c9",
      class: "point" });
    dot.append(svg("title", {}, `${p.label}: ${xLabel} ${fmt(p.x)}, ${yLabel} ${fmt(p.y)}`));
    root.append(dot);
    if (p.label !== undefined) {  // labels on the inner side, so none leaves the frame
      const x = sx.map(p.x), right = x > (PAD.l + W - PAD.r) / 2;
      const y = sy.map(p.y), below = y < PAD.t + 12;
      root.append(svg("text", { x: right ? x - 6 : x + 6, y: below ? y + 14 : y - 6,
        "text-anchor": right ? "end" : "start", "font-size": 10 }, p.label));
    }
  }
  return root;
}
