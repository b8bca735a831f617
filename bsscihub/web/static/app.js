/* bsscihub admin UI behaviour: confirmations, copy buttons, canvas charts and the live event stream.
   Served by the hub itself and loaded as a file (the CSP allows no inline script). */
(function () {
  "use strict";

  // -- small helpers

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text; // never innerHTML: event data is untrusted
    return node;
  }

  function readJSON(node, name) {
    var raw = node.getAttribute(name);
    if (!raw) return null;
    try { return JSON.parse(raw); } catch (e) { return null; }
  }

  function fmtTime(seconds) {
    var d = new Date(seconds * 1000);
    return d.toISOString().replace("T", " ").slice(0, 19) + " UTC";
  }

  function fmtValue(v) {
    if (v === undefined || v === null || v === "") return "—";
    if (typeof v === "number" && !Number.isInteger(v)) return String(Number(v.toFixed(2)));
    return String(v);
  }

  function get(obj, path) {
    var parts = path.split(".");
    for (var i = 0; i < parts.length && obj != null; i++) obj = obj[parts[i]];
    return obj;
  }

  function pick(obj, path) {
    var v = get(obj, path);
    return typeof v === "number" ? v : null;
  }

  // -- forms: confirmations, auto-submit, copy-once secrets

  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    var question = form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) ev.preventDefault();
  });

  document.addEventListener("change", function (ev) {
    var t = ev.target;
    if (t.hasAttribute && t.hasAttribute("data-autosubmit") && t.form) t.form.submit();
  });

  document.addEventListener("click", function (ev) {
    var btn = ev.target.closest ? ev.target.closest("[data-copy]") : null;
    if (!btn) return;
    var source = document.getElementById(btn.getAttribute("data-copy"));
    if (!source) return;
    var done = function () { btn.textContent = "Copied"; };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(source.textContent).then(done);
    } else {
      var range = document.createRange();
      range.selectNodeContents(source);
      var sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      try { document.execCommand("copy"); done(); } catch (e) { /* selected for manual copy */ }
    }
  });

  // -- charts on <canvas>, drawn at device resolution

  var COLORS = ["#0f766e", "#d97706", "#2563eb", "#b42318"];

  function setup(canvas) {
    var ratio = window.devicePixelRatio || 1;
    var w = canvas.clientWidth || 300, h = canvas.clientHeight || 180;
    canvas.width = Math.round(w * ratio);
    canvas.height = Math.round(h * ratio);
    var ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, w, h);
    ctx.font = "11px system-ui, sans-serif";
    return { ctx: ctx, w: w, h: h };
  }

  function niceMax(v) {
    if (v <= 5) return 5;
    var p = Math.pow(10, Math.floor(Math.log10(v)));
    var n = v / p;
    return (n <= 2 ? 2 : n <= 5 ? 5 : 10) * p;
  }

  function grid(c, left, top, right, bottom, lo, hi, ticks, label) {
    var ctx = c.ctx;
    ctx.strokeStyle = "#e2e7ec";
    ctx.fillStyle = "#66727f";
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (var i = 0; i <= ticks; i++) {
      var v = lo + (hi - lo) * i / ticks;
      var y = bottom - (bottom - top) * i / ticks;
      ctx.beginPath();
      ctx.moveTo(left, Math.round(y) + 0.5);
      ctx.lineTo(right, Math.round(y) + 0.5);
      ctx.stroke();
      ctx.fillText(label ? label(v) : String(Math.round(v)), left - 6, y);
    }
  }

  function drawBars(canvas, rates, match) {
    var c = setup(canvas), ctx = c.ctx;
    var series = rates && rates.series ? rates.series : {};
    var values = null;
    Object.keys(series).forEach(function (channel) {
      if (match && !match.some(function (m) { return channel.slice(-m.length) === m; })) return;
      var s = series[channel];
      if (!values) values = s.slice(); else for (var i = 0; i < s.length; i++) values[i] += s[i];
    });
    if (!values) values = new Array(60).fill(0);
    var left = 34, right = c.w - 6, top = 8, bottom = c.h - 20;
    var max = niceMax(Math.max.apply(null, values.concat([1])));
    grid(c, left, top, right, bottom, 0, max, 4);
    var bw = (right - left) / values.length;
    ctx.fillStyle = COLORS[0];
    values.forEach(function (v, i) {
      var bh = (bottom - top) * v / max;
      ctx.fillRect(left + i * bw + 1, bottom - bh, Math.max(1, bw - 2), bh);
    });
    ctx.fillStyle = "#66727f";
    ctx.textAlign = "left";
    ctx.textBaseline = "alphabetic";
    ctx.fillText("-60 min", left, c.h - 4);
    ctx.textAlign = "right";
    ctx.fillText("now", right, c.h - 4);
  }

  function drawLines(canvas, points, series) {
    var c = setup(canvas), ctx = c.ctx;
    var left = 40, right = c.w - 40, top = 10, bottom = c.h - 22;
    if (!points.length) {
      ctx.fillStyle = "#66727f";
      ctx.textAlign = "center";
      ctx.fillText("no data yet", c.w / 2, c.h / 2);
      return;
    }
    var t0 = points[0].t, t1 = points[points.length - 1].t;
    if (t1 === t0) t1 = t0 + 1;
    series.forEach(function (s, k) {
      var vals = points.map(function (p) { return p.v[k]; }).filter(function (v) { return v !== null; });
      if (!vals.length) return;
      // Whole-number ticks: widen the range to a multiple of four steps.
      var lo = Math.floor(Math.min.apply(null, vals) - 1), hi = Math.ceil(Math.max.apply(null, vals) + 1);
      var step = Math.max(1, Math.ceil((hi - lo) / 4));
      hi = lo + 4 * step;
      if (k === 0) grid(c, left, top, right, bottom, lo, hi, 4);
      else {
        ctx.fillStyle = COLORS[k];
        ctx.textAlign = "left";
        for (var i = 0; i <= 4; i++) ctx.fillText(String(Math.round(lo + (hi - lo) * i / 4)), right + 6, bottom - (bottom - top) * i / 4);
      }
      ctx.strokeStyle = COLORS[k];
      ctx.fillStyle = COLORS[k];
      ctx.lineWidth = 2;
      ctx.beginPath();
      var started = false;
      points.forEach(function (p) {
        var v = p.v[k];
        if (v === null) return;
        var x = left + (right - left) * (p.t - t0) / (t1 - t0);
        var y = bottom - (bottom - top) * (v - lo) / (hi - lo);
        if (started) ctx.lineTo(x, y); else { ctx.moveTo(x, y); started = true; }
      });
      ctx.stroke();
      points.forEach(function (p) {
        var v = p.v[k];
        if (v === null) return;
        var x = left + (right - left) * (p.t - t0) / (t1 - t0);
        var y = bottom - (bottom - top) * (v - lo) / (hi - lo);
        ctx.fillRect(x - 2, y - 2, 4, 4);
      });
    });
    ctx.fillStyle = "#66727f";
    ctx.textAlign = "left";
    ctx.fillText(fmtTime(t0).slice(5, 16), left, c.h - 5);
    ctx.textAlign = "right";
    ctx.fillText(fmtTime(t1).slice(5, 16), right, c.h - 5);
  }

  var charts = [];

  function initCharts() {
    Array.prototype.forEach.call(document.querySelectorAll("canvas[data-chart]"), function (canvas) {
      var chart = { canvas: canvas, kind: canvas.getAttribute("data-chart") };
      if (chart.kind === "bars") {
        chart.rates = readJSON(canvas, "data-rates") || { series: {} };
        chart.match = readJSON(canvas, "data-match");  // channel endings counted, e.g. ["/uplink"]
        chart.draw = function () { drawBars(canvas, chart.rates, chart.match); };
      } else {
        chart.points = readJSON(canvas, "data-points") || [];
        chart.series = readJSON(canvas, "data-series") || [];
        chart.draw = function () { drawLines(canvas, chart.points, chart.series); };
      }
      charts.push(chart);
      chart.draw();
    });
    var pending = null;
    window.addEventListener("resize", function () {
      clearTimeout(pending);
      pending = setTimeout(function () { charts.forEach(function (c) { c.draw(); }); }, 150);
    });
  }

  // Keep the per-minute bars moving: a new (empty) minute starts on the clock.
  function advanceMinute(chart) {
    var rates = chart.rates;
    var now = Math.floor(Date.now() / 60000) * 60;
    var end = rates.start + rates.step * ((Object.values(rates.series)[0] || new Array(60)).length - 1);
    if (!rates.start) { rates.start = now - 59 * 60; rates.step = 60; return; }
    while (end < now) {
      Object.keys(rates.series).forEach(function (k) { rates.series[k].shift(); rates.series[k].push(0); });
      rates.start += 60;
      end += 60;
    }
  }

  function countEvent(channel) {
    charts.forEach(function (chart) {
      if (chart.kind !== "bars") return;
      advanceMinute(chart);
      var s = chart.rates.series[channel];
      if (!s) { s = chart.rates.series[channel] = new Array(60).fill(0); }
      s[s.length - 1] += 1;
      chart.draw();
    });
  }

  // -- the live stream (WebSocket, authenticated by the session cookie)

  function startStream(section) {
    var channels = readJSON(section, "data-stream") || ["*"];
    var filterKey = section.getAttribute("data-filter-key");
    var filterValue = section.getAttribute("data-filter-value");
    var tbody = section.querySelector("tbody");
    var empty = section.querySelector(".empty");
    var pill = document.getElementById("live-state");
    var delay = 1000;

    function setState(state, text) {
      if (!pill) return;
      pill.setAttribute("data-state", state);
      pill.textContent = text;
    }

    var rowKey = section.getAttribute("data-row-key");

    // False when the row is there already (rendered by the server just as the event came in).
    function addRow(ev) {
      if (!tbody) return true;
      var tr = el("tr", "fresh");
      if (rowKey) {
        var key = String(get(ev.payload, rowKey));
        if (tbody.querySelector('tr[data-key="' + CSS.escape(key) + '"]')) return false;
        tr.setAttribute("data-key", key);
      }
      var paths = readJSON(section, "data-row-paths");
      if (paths) {
        tr.appendChild(el("td", "nowrap", fmtTime(ev.time)));
        paths.forEach(function (path) {
          tr.appendChild(el("td", "mono", fmtValue(get(ev.payload, path))));
        });
      } else {
        tr.appendChild(el("td", "nowrap", fmtTime(ev.time)));
        var chan = el("td");
        chan.appendChild(el("span", "chan", ev.channel));
        tr.appendChild(chan);
        tr.appendChild(el("td", "mono", ev.topic));
        tr.appendChild(el("td", "mono clip", JSON.stringify(ev.payload)));
      }
      tbody.insertBefore(tr, tbody.firstChild);
      while (tbody.children.length > 50) tbody.removeChild(tbody.lastChild);
      if (empty) empty.hidden = true;
      return true;
    }

    function addPoint(ev) {
      charts.forEach(function (chart) {
        if (chart.kind !== "lines") return;
        var v = chart.series.map(function (s) { return pick(ev.payload, s.path); });
        chart.points.push({ t: ev.time, v: v });
        if (chart.points.length > 500) chart.points.shift();
        chart.draw();
      });
    }

    function connect() {
      var scheme = location.protocol === "https:" ? "wss:" : "ws:";
      var ws = new WebSocket(scheme + "//" + location.host + "/api/v1/stream");
      ws.onopen = function () {
        delay = 1000;
        ws.send(JSON.stringify({ subscribe: channels }));
      };
      ws.onmessage = function (msg) {
        var data;
        try { data = JSON.parse(msg.data); } catch (e) { return; }
        if (data.subscribed) setState("live", "live");
        if (!data.event) return;
        var ev = data.event;
        if (filterKey && (!ev.payload || String(ev.payload[filterKey]) !== filterValue)) return;
        if (!addRow(ev)) return;
        countEvent(ev.channel);
        addPoint(ev);
        document.dispatchEvent(new CustomEvent("hub:event", { detail: ev }));
      };
      ws.onclose = function () {
        setState("offline", "offline — retrying");
        setTimeout(connect, delay);
        delay = Math.min(delay * 2, 30000);
      };
    }
    connect();
  }

  function init() {
    initCharts();
    var section = document.querySelector("[data-stream]");
    if (section) startStream(section);
    setInterval(function () {
      charts.forEach(function (c) { if (c.kind === "bars") { advanceMinute(c); c.draw(); } });
    }, 15000);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
