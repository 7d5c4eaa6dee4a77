// saekit feature dashboards: the viewer behind features.html. Data come from features/index.js
// (every feature's class, density, outcome and search tokens) and features/f-NNNN.js (the full
// records, CHUNK features per file), loaded with <script> tags so the page works from disk.
"use strict";
var INDEX = null, CHUNKS = {}, WAITING = {};
function saekitIndex(ix) { INDEX = ix; init(); }
function saekitNoIndex() { say("features/index.js did not load: keep the features/ folder beside features.html."); }
function saekitChunk(k, recs) {
  CHUNKS[k] = recs;
  (WAITING[k] || []).forEach(function (cb) { cb(); });
  delete WAITING[k];
}
function esc(s) {
  return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
}
function sci(x) { return x === null || x === undefined ? "n/a" : x === 0 ? "0" : Number(x).toExponential(1); }
function g3(x) { return x === null || x === undefined ? "n/a" : String(Number(Number(x).toPrecision(3))); }
function pad4(k) { return ("000" + k).slice(-4); }

function loadChunk(k, cb) {
  if (CHUNKS[k]) { cb(); return; }
  if (WAITING[k]) { WAITING[k].push(cb); return; }
  WAITING[k] = [cb];
  var s = document.createElement("script");
  s.src = "features/f-" + pad4(k) + ".js";
  s.onerror = function () { say("could not load " + s.src + ": is the features/ folder beside this page?"); };
  document.body.appendChild(s);
}
function say(html) { document.getElementById("dash").innerHTML = "<p class='note'>" + html + "</p>"; }

// A small SVG chart: points (x, y; y null = a gap), optional extra line [[x, y], [x, y]],
// optional vertical event lines; axis labels at the ends.
function chart(xs, ys, o) {
  var W = 480, H = 170, L = 48, R = 8, T = 10, B = 28;
  var pts = [];
  for (var i = 0; i < xs.length; i++) if (ys[i] !== null && ys[i] !== undefined) pts.push([xs[i], ys[i]]);
  if (!pts.length) return "<p class='note'>" + (o.empty || "nothing to draw") + "</p>";
  var all = pts.concat(o.line || []);
  var x0 = Math.min.apply(null, all.map(function (p) { return p[0]; })), x1 = Math.max.apply(null, all.map(function (p) { return p[0]; }));
  var y0 = Math.min.apply(null, all.map(function (p) { return p[1]; })), y1 = Math.max.apply(null, all.map(function (p) { return p[1]; }));
  if (o.ymin !== undefined) y0 = Math.min(y0, o.ymin);
  if (x1 === x0) { x1 = x0 + 1; }
  if (y1 === y0) { y1 = y0 + 1; y0 = y0 - 1; }
  var sx = function (x) { return L + (x - x0) / (x1 - x0) * (W - L - R); };
  var sy = function (y) { return T + (y1 - y) / (y1 - y0) * (H - T - B); };
  var s = "<svg width='" + W + "' height='" + H + "' viewBox='0 0 " + W + " " + H + "'>";
  (o.events || []).forEach(function (e) {
    if (e >= x0 && e <= x1) s += "<line x1='" + sx(e) + "' x2='" + sx(e) + "' y1='" + T + "' y2='" + (H - B) + "' stroke='#aaa' stroke-dasharray='3,3'/>";
  });
  s += "<line x1='" + L + "' x2='" + L + "' y1='" + T + "' y2='" + (H - B) + "' stroke='#888'/>";
  s += "<line x1='" + L + "' x2='" + (W - R) + "' y1='" + (H - B) + "' y2='" + (H - B) + "' stroke='#888'/>";
  var fy = o.fy || g3;
  s += "<text x='" + (L - 4) + "' y='" + (T + 8) + "' font-size='10' text-anchor='end'>" + esc(fy(y1)) + "</text>";
  s += "<text x='" + (L - 4) + "' y='" + (H - B) + "' font-size='10' text-anchor='end'>" + esc(fy(y0)) + "</text>";
  s += "<text x='" + L + "' y='" + (H - 8) + "' font-size='10'>" + esc(g3(x0)) + "</text>";
  s += "<text x='" + (W - R) + "' y='" + (H - 8) + "' font-size='10' text-anchor='end'>" + esc(g3(x1)) + "</text>";
  s += "<text x='" + ((L + W) / 2) + "' y='" + (H - 8) + "' font-size='10' text-anchor='middle'>" + esc(o.xlabel || "") + "</text>";
  if (o.bars) {
    var bw = Math.max(1, (W - L - R) / xs.length - 1);
    pts.forEach(function (p) { s += "<rect x='" + (sx(p[0]) - bw / 2) + "' y='" + sy(p[1]) + "' width='" + bw + "' height='" + (H - B - sy(p[1])) + "' fill='#1f77b4'/>"; });
  } else {
    s += "<polyline fill='none' stroke='#1f77b4' stroke-width='1.5' points='" + pts.map(function (p) { return sx(p[0]) + "," + sy(p[1]); }).join(" ") + "'/>";
    pts.forEach(function (p) { s += "<circle cx='" + sx(p[0]) + "' cy='" + sy(p[1]) + "' r='2.5' fill='#1f77b4'><title>" + esc(g3(p[0]) + ": " + fy(p[1])) + "</title></circle>"; });
  }
  if (o.line) s += "<line x1='" + sx(o.line[0][0]) + "' y1='" + sy(o.line[0][1]) + "' x2='" + sx(o.line[1][0]) + "' y2='" + sy(o.line[1][1]) + "' stroke='#d62728' stroke-width='1.5' stroke-dasharray='5,3'/>";
  return s + "</svg>";
}

function box(title, body) { return "<div class='box'><h3>" + esc(title) + "</h3>" + body + "</div>"; }
function flink(j) { return "<a href='#" + j + "'>" + j + "</a>"; }

function histogramBox(r) {
  if (!INDEX.scanned) return "<p class='note'>No rows were scanned (pass --cache, or --scan-tokens on a synthetic run).</p>";
  if (!r.hs || !r.hs.length) return "<p class='note'>No firing in the " + INDEX.scanned.toLocaleString() + " rows scanned.</p>";
  var lo = INDEX.hist[0], w = (INDEX.hist[1] - INDEX.hist[0]) / INDEX.hist[2], xs = [], ys = [];
  for (var j = 1; j < r.hs.length; j++) { xs.push(lo + (r.hs[0] + j - 0.5) * w); ys.push(r.hs[j]); }
  var n = ys.reduce(function (a, b) { return a + b; }, 0);
  return chart(xs, ys, { bars: true, xlabel: "log10 activation", ymin: 0, fy: function (y) { return String(Math.round(y)); } }) +
    "<p class='note'>" + n.toLocaleString() + " firings in " + INDEX.scanned.toLocaleString() + " rows of " + esc(INDEX.scan_source) + ".</p>";
}

function examplesBox(r) {
  if (!INDEX.scanned) return "<p class='note'>No rows were scanned: no examples.</p>";
  if (!r.ex.length) return "<p class='note'>No firing in the " + INDEX.scanned.toLocaleString() + " rows scanned.</p>";
  var top = Math.max.apply(null, r.ex.map(function (e) { return e[1]; })) || 1;
  var rows = r.ex.map(function (e) {
    var cell;
    if (e.length === 5) {
      var a = Math.max(0.15, Math.min(1, e[1] / top));
      cell = "<span class='ctx'>" + esc(e[2]) + "<span style='background:rgba(255,140,0," + a.toFixed(2) + ")' title='activation " + esc(g3(e[1])) + "'>" + esc(e[3]) + "</span>" + esc(e[4]) + "</span>";
    } else {
      var m = r.gt ? r.gt.true : -2;
      cell = e[2].length ? e[2].map(function (t) { return t === m ? "<b>#" + t + "</b>" : "#" + t; }).join(", ") : "<span class='note'>none (noise only)</span>";
    }
    return "<tr><td>" + esc(e[0]) + "</td><td>" + esc(g3(e[1])) + "</td><td>" + cell + "</td></tr>";
  });
  var head = INDEX.synthetic ? "true features active in the row (bold: this feature's match)" : "context (activating token shaded)";
  return "<table><tr><th>from</th><th>activation</th><th>" + head + "</th></tr>" + rows.join("") + "</table>";
}

function logitBox(r) {
  if (!r.lt) return "<p class='note'>" + (INDEX.synthetic ? "Synthetic activations: there is no model, so no logit weights." : "Logit weights were not computed (--no-logits, or no path to the logits from this site).") + "</p>";
  var cells = function (l) { return l.map(function (p) { return "<td><span class='ctx'>" + esc(JSON.stringify(p[0])) + "</span> " + esc(g3(p[1])) + "</td>"; }).join(""); };
  return "<table><tr><th>top</th>" + cells(r.lt.slice(0, 6)) + "</tr><tr><th>bottom</th>" + cells(r.lb.slice(0, 6)) + "</tr></table>";
}

function densityBox(r) {
  if (!INDEX.steps.length) return "<p class='note'>No density history in the run dir.</p>";
  var ys = r.dens, line = null, note = "";
  if (r.t && r.t[0] !== null && INDEX.baseline_trend !== null && INDEX.tokens_per_step) {
    var slope = (r.t[0] + INDEX.baseline_trend) / 1e7 * INDEX.tokens_per_step, pts = [];
    for (var i = Math.floor(ys.length / 2); i < ys.length; i++) if (ys[i] !== null) pts.push([INDEX.steps[i], ys[i]]);
    if (pts.length) {
      var mx = pts.reduce(function (a, p) { return a + p[0]; }, 0) / pts.length, my = pts.reduce(function (a, p) { return a + p[1]; }, 0) / pts.length;
      var xa = pts[0][0], xb = pts[pts.length - 1][0];
      line = [[xa, my + slope * (xa - mx)], [xb, my + slope * (xb - mx)]];
      note = "Dashed: the fitted trend (" + g3(r.t[0]) + " [" + g3(r.t[1]) + ", " + g3(r.t[2]) + "] decades per 1e7 tokens relative to the live baseline, plus the baseline's " + g3(INDEX.baseline_trend) + "), through the later windows. ";
    }
  }
  return chart(INDEX.steps, ys, { xlabel: "training step", line: line, events: INDEX.events, fy: function (y) { return sci(Math.pow(10, y)); }, empty: "Zero firings in every window." }) +
    "<p class='note'>" + note + "log10 density per window pooled to resolve " + sci(INDEX.rare_threshold) + "; gaps: zero firings; dotted: resampling events.</p>";
}

function marginBox(r) {
  if (!r.mg) return "<p class='note'>No mechanisms.safetensors in the run dir: no margin over training.</p>";
  return chart(INDEX.mech_steps, r.mg, { xlabel: "training step", events: INDEX.events }) +
    "<p class='note'>Largest pre-activation in each window's last batch: it sinks below 0 as a feature stops firing.</p>";
}

function render(r) {
  var t = r.o ? r.o + (r.g ? " (" + r.g + ")" : "") : "not tested";
  var head = "<h2>Feature " + r.i + " <span class='tag'>" + esc(r.c) + "</span>" + (r.h ? " <span class='tag'>control group</span>" : "") + "</h2>" +
    "<p>density " + sci(r.d) + " &middot; trajectory: " + esc(t) + (r.t && r.t[0] !== null ? ", trend " + g3(r.t[0]) + " [" + g3(r.t[1]) + ", " + g3(r.t[2]) + "] decades per 1e7 tokens" : "") +
    " &middot; encoder bias " + g3(r.b) + " &middot; D/E " + g3(r.de) + " &middot; enc/dec cosine " + g3(r.cos) + " &middot; margin " + g3(r.m) + "</p>";
  if (r.gt) head += "<p>ground truth: " + (r.gt.true >= 0 ? "matches true feature #" + r.gt.true + " (true frequency " + sci(r.gt.p) + ", decoder cosine " + g3(r.gt.cos) + ")" : "matches no true feature: the nearest, #" + r.gt.best + ", is at decoder cosine " + g3(r.gt.cos) + ", below the matching threshold") + (r.gt.label ? "; class <b>" + esc(r.gt.label) + "</b>" : "") + "</p>";
  var nn = r.nn ? r.nn.map(function (p) { return flink(p[0]) + " (" + p[1].toFixed(2) + ")"; }).join(", ") : "none";
  document.getElementById("dash").innerHTML = head + "<div class='grid'>" +
    box("Activation histogram", histogramBox(r)) + box("Density over training", densityBox(r)) +
    box("Examples: top and activation quantiles", examplesBox(r)) + box("Margin over training", marginBox(r)) +
    box("Logit weights", logitBox(r)) + box("Nearest features by decoder cosine", "<p>" + nn + "</p>") + "</div>";
  document.getElementById("nav").innerHTML = (r.i > 0 ? flink(r.i - 1) + " &larr; " : "") + "feature " + r.i + (r.i + 1 < INDEX.n ? " &rarr; " + flink(r.i + 1) : "");
  document.title = "feature " + r.i + " - saekit";
}

function show(i) {
  if (!(i >= 0 && i < INDEX.n)) { say("No feature " + esc(i) + ": indices run from 0 to " + (INDEX.n - 1) + "."); return; }
  var k = Math.floor(i / INDEX.chunk);
  loadChunk(k, function () { render(CHUNKS[k][i - k * INDEX.chunk]); });
}

function search(q) {
  q = q.trim();
  var hits = document.getElementById("hits");
  hits.innerHTML = "";
  if (/^\d+$/.test(q)) { location.hash = "#" + q; return; }
  if (!q) return;
  var ql = q.toLowerCase(), found = [];
  for (var i = 0; i < INDEX.n && found.length < 200; i++) {
    if ((" " + INDEX.tk[i].toLowerCase() + " ").indexOf(ql) >= 0) found.push(i);
  }
  hits.innerHTML = found.length ? "<p class='note'>" + found.length + (found.length === 200 ? "+" : "") + " features with &quot;" + esc(q) + "&quot; among their top logit or activating tokens:</p>" +
    found.map(function (i) { return "<a class='hit' href='#" + i + "'>" + i + " <span class='note'>" + esc(INDEX.classes[INDEX.c[i]]) + ", " + sci(INDEX.d[i]) + "</span></a>"; }).join("")
    : "<p class='note'>No feature has &quot;" + esc(q) + "&quot; among its top logit or activating tokens.</p>";
  if (found.length === 1) location.hash = "#" + found[0];
}

function route() {
  var h = location.hash.replace("#", "");
  if (/^\d+$/.test(h)) show(parseInt(h, 10));
}

function init() {
  var q = document.getElementById("q");
  document.getElementById("go").onclick = function () { search(q.value); };
  q.addEventListener("keydown", function (e) { if (e.key === "Enter") search(q.value); });
  window.addEventListener("hashchange", route);
  var params = new URLSearchParams(location.search);
  if (params.get("q")) { q.value = params.get("q"); search(params.get("q")); }
  if (location.hash) route();
  else say(INDEX.n.toLocaleString() + " features. Type an index or a token, or click a point in the report.");
}
