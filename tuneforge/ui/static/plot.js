// A small SVG line chart: several named series of [x, y] points on one step axis, linear or log y.
"use strict";
var TFPlot = (function () {
  var PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"];
  var NS = "http://www.w3.org/2000/svg";

  function el(name, attrs, text) {
    var node = document.createElementNS(NS, name);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) { node.textContent = text; }
    return node;
  }

  function ticks(lo, hi, count) {
    var span = hi - lo || 1, step = Math.pow(10, Math.floor(Math.log10(span / count)));
    [1, 2, 5, 10].some(function (m) { if (span / (step * m) <= count) { step *= m; return true; } return false; });
    var out = [];
    for (var v = Math.ceil(lo / step) * step; v <= hi + 1e-9 * span; v += step) { out.push(+v.toPrecision(12)); }
    return out;
  }

  function fmt(v) { return Math.abs(v) >= 1000 || (v !== 0 && Math.abs(v) < 0.01) ? v.toExponential(1) : +v.toPrecision(3) + ""; }

  // draw(container, {name: [[x, y], ...]}, {log: bool, hidden: {name: true}, onToggle: fn})
  function draw(container, series, options) {
    options = options || {};
    var W = 900, H = 380, L = 58, R = 16, T = 14, B = 40;
    var names = Object.keys(series), hidden = options.hidden || {};
    var shown = names.filter(function (n) { return !hidden[n]; });
    var log = !!options.log, xs = [], ys = [];
    shown.forEach(function (n) { series[n].forEach(function (p) {
      if (!log || p[1] > 0) { xs.push(p[0]); ys.push(log ? Math.log10(p[1]) : p[1]); } }); });
    container.innerHTML = "";
    var svg = el("svg", {viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": "loss curves"});
    container.appendChild(svg);
    var points = 0;
    if (xs.length) {
      var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
      var y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys);
      if (x1 === x0) { x1 = x0 + 1; }
      var pad = (y1 - y0) * 0.06 || Math.abs(y0) * 0.05 || 0.5; y0 -= pad; y1 += pad;
      var sx = function (x) { return L + (x - x0) / (x1 - x0) * (W - L - R); };
      var sy = function (y) { return T + (1 - (y - y0) / (y1 - y0)) * (H - T - B); };
      ticks(x0, x1, 8).forEach(function (t) {
        svg.appendChild(el("line", {x1: sx(t), x2: sx(t), y1: T, y2: H - B, stroke: "#eee"}));
        svg.appendChild(el("text", {x: sx(t), y: H - B + 15, "text-anchor": "middle"}, fmt(t)));
      });
      ticks(y0, y1, 6).forEach(function (t) {
        svg.appendChild(el("line", {x1: L, x2: W - R, y1: sy(t), y2: sy(t), stroke: "#eee"}));
        svg.appendChild(el("text", {x: L - 6, y: sy(t) + 4, "text-anchor": "end"}, fmt(log ? Math.pow(10, t) : t)));
      });
      names.forEach(function (n, i) {
        if (hidden[n]) { return; }
        var pts = series[n].filter(function (p) { return !log || p[1] > 0; });
        var d = pts.map(function (p) { return sx(p[0]).toFixed(1) + "," + sy(log ? Math.log10(p[1]) : p[1]).toFixed(1); });
        var colour = PALETTE[i % PALETTE.length];
        svg.appendChild(el("polyline", {points: d.join(" "), fill: "none", stroke: colour, "stroke-width": 2,
          "stroke-dasharray": /term/.test(n) ? "4 3" : "", "data-series": n, "class": "series"}));
        if (pts.length < 40 || /eval|retain/.test(n)) {
          pts.forEach(function (p) {
            svg.appendChild(el("circle", {cx: sx(p[0]), cy: sy(log ? Math.log10(p[1]) : p[1]), r: 2.8, fill: colour}));
          });
        }
        points += pts.length;
      });
    } else {
      svg.appendChild(el("text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, "no points yet"));
    }
    svg.appendChild(el("line", {x1: L, x2: W - R, y1: H - B, y2: H - B, stroke: "#333"}));
    svg.appendChild(el("line", {x1: L, x2: L, y1: T, y2: H - B, stroke: "#333"}));
    svg.appendChild(el("text", {x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle"}, "optimizer step"));
    svg.appendChild(el("text", {x: 12, y: (T + H - B) / 2, "text-anchor": "middle",
      transform: "rotate(-90 12 " + (T + H - B) / 2 + ")"}, log ? "loss (nats, log scale)" : "loss (nats)"));
    svg.setAttribute("data-points", points);
    var legend = document.createElement("div");
    legend.className = "legend";
    names.forEach(function (n, i) {
      var item = document.createElement("span");
      item.innerHTML = '<i style="background:' + PALETTE[i % PALETTE.length] + '"></i>';
      item.appendChild(document.createTextNode(n + " (" + series[n].length + ")"));
      if (hidden[n]) { item.className = "off"; }
      item.title = "click to hide or show";
      item.addEventListener("click", function () { if (options.onToggle) { options.onToggle(n); } });
      legend.appendChild(item);
    });
    container.appendChild(legend);
    return points;
  }

  return {draw: draw};
})();
