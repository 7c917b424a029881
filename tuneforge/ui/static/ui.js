// tuneforge ui: live tables and curves (Server-Sent Events), the config editor, chat and export.
"use strict";
(function () {
  var csrf = document.querySelector('meta[name="csrf"]').content;
  var page = document.body.dataset.page;
  var NOT_TERMS = ["step", "epoch", "loss", "lr", "tokens_per_s", "grad_norm", "task", "split"];

  function post(url, body) {
    return fetch(url, {method: "POST", headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
      body: JSON.stringify(body), credentials: "same-origin"})
      .then(function (r) {
        return r.text().then(function (t) {
          try { return JSON.parse(t); } catch (e) { return {ok: false, message: t || ("HTTP " + r.status)}; }
        });
      });
  }

  // Click a header to sort by it (again to reverse); cells sort by data-value, blanks last.
  function sortTable(table, column, ascending) {
    var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[column] ? a.cells[column].dataset.value : "", y = b.cells[column] ? b.cells[column].dataset.value : "";
      if (x === undefined || y === undefined) { return 0; }
      if (x === "" || y === "") { return (x === "") - (y === ""); }
      var nx = parseFloat(x), ny = parseFloat(y);
      var order = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
      return ascending ? order : -order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  }
  function resort(table) {
    var th = table.querySelector("th[aria-sort]");
    if (th) { sortTable(table, Array.prototype.indexOf.call(th.parentNode.children, th), th.getAttribute("aria-sort") === "ascending"); }
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    table.querySelectorAll("th.sortable").forEach(function (th, column) {
      th.addEventListener("click", function () {
        var ascending = th.getAttribute("aria-sort") !== "ascending";
        table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
        sortTable(table, column, ascending);
      });
    });
  });

  if (page === "runs") {
    var source = new EventSource("/events/runs");
    source.addEventListener("rows", function (e) {
      document.getElementById("runs-body").innerHTML = JSON.parse(e.data).html;
      resort(document.getElementById("runs"));
    });
  }

  if (page === "run") {
    var head = document.getElementById("run-head"), runId = head.dataset.run;
    var initial = document.getElementById("run-state").textContent.trim();
    var container = document.getElementById("plot"), logBox = document.getElementById("log");
    var records = [], before = null, after = null, hidden = {}, reloaded = false;
    var redraw = function () {
      var series = {};
      var add = function (name, x, y) { if (typeof y === "number" && isFinite(y)) { (series[name] = series[name] || []).push([x, y]); } };
      if (before) { add("eval loss", 0, before.eval); add("retain loss", 0, before.retain); }
      records.forEach(function (r) {
        if (r.step === undefined) { return; }
        if ((r.split || "train") === "train") {
          add("train loss" + (r.task ? " (" + r.task + ")" : ""), r.step, r.loss);
          Object.keys(r).forEach(function (k) { if (NOT_TERMS.indexOf(k) < 0) { add(k + " term", r.step, r[k]); } });
        } else if (r.split === "eval") {
          add("eval loss", r.step, r.loss); add("retain loss", r.step, r.retain_loss);
        }
      });
      if (after) { add("eval loss", after.step, after.eval); add("retain loss", after.step, after.retain); }
      TFPlot.draw(container, series, {log: document.getElementById("logscale").checked, hidden: hidden,
        onToggle: function (n) { hidden[n] = !hidden[n]; redraw(); }});
    };
    document.getElementById("logscale").addEventListener("change", redraw);
    redraw();
    var stream = new EventSource("/events/run?run=" + encodeURIComponent(runId));
    stream.addEventListener("before", function (e) { before = JSON.parse(e.data); redraw(); });
    stream.addEventListener("reset", function () { records = []; redraw(); });
    stream.addEventListener("metrics", function (e) { records = records.concat(JSON.parse(e.data)); redraw(); });
    stream.addEventListener("status", function (e) {
      var s = JSON.parse(e.data), badge = document.getElementById("run-state");
      badge.textContent = s.state; badge.className = "state " + s.state;
      document.getElementById("run-step").textContent = "step " + s.step + (s.total_steps ? " / " + s.total_steps : "");
      document.getElementById("stop").disabled = s.state !== "running";
      document.getElementById("resume").disabled = s.state === "running" || s.state === "starting" || s.state === "finished";
      if (s.log && logBox) { logBox.textContent = s.log; }
      if (s.after) { after = s.after; redraw(); }
      var ended = s.state !== initial && s.state !== "running" && s.state !== "starting";
      if ((ended || (initial === "starting" && s.state === "running")) && !reloaded) {
        reloaded = true;  // the run started (its config is there) or ended (its results are)
        setTimeout(function () { location.replace("/run/" + runId); }, 600);
      }
    });
    stream.addEventListener("done", function () { stream.close(); });
    [["export-merged", "merged", "--merged"], ["export-gguf", "gguf", "--gguf"]].forEach(function (spec) {
      var exportButton = document.getElementById(spec[0]);
      if (!exportButton) { return; }
      exportButton.addEventListener("click", function () {
        var out = document.getElementById("export-result");
        exportButton.disabled = true; out.textContent = "exporting (tuneforge export " + spec[2] + ") …";
        post("/api/export", {run: runId, format: spec[1]}).then(function (r) {
          out.textContent = r.message; exportButton.disabled = false;
        });
      });
    });
  }

  if (page === "new") {
    var editor = document.getElementById("yaml"), gutter = document.getElementById("gutter");
    var report = document.getElementById("validation"), side = document.getElementById("side-result");
    var runName = document.getElementById("run-name"), configName = document.getElementById("config-name");
    var root = document.getElementById("new-data").dataset.root, badLine = null, timer = null, sequence = 0;
    var numbers = function () {
      var count = editor.value.split("\n").length, html = [];
      for (var i = 1; i <= count; i++) { html.push(i === badLine ? '<span class="bad">' + i + "</span>" : i); }
      gutter.innerHTML = html.join("\n");
      gutter.scrollTop = editor.scrollTop;
    };
    var quote = function (s) { return /^[A-Za-z0-9_.\/:=-]+$/.test(s) ? s : "'" + s.replace(/'/g, "'\"'\"'") + "'"; };
    var command = function () {
      document.getElementById("command").textContent = "tuneforge train " + quote(root + "/configs/" + configName.value + ".yaml") +
        " --output " + quote(root + "/" + runName.value);
    };
    var show = function (r) {
      badLine = r.line || null;
      report.textContent = r.message;
      report.className = "validation " + (r.ok ? "ok" : "bad");
      numbers();
    };
    var validate = function () {
      var mine = ++sequence;
      post("/api/validate", {yaml: editor.value, config_name: configName.value || "config"})
        .then(function (r) { if (mine === sequence) { show(r); } });
    };
    var later = function () { clearTimeout(timer); report.textContent = "checking…"; report.className = "validation"; timer = setTimeout(validate, 500); };
    editor.addEventListener("input", function () { numbers(); later(); });
    editor.addEventListener("scroll", function () { gutter.scrollTop = editor.scrollTop; });
    runName.addEventListener("input", function () { configName.value = runName.value; command(); });
    configName.addEventListener("input", command);
    document.getElementById("load").addEventListener("change", function (e) {
      if (!e.target.value) { return; }
      fetch("/api/config?source=" + encodeURIComponent(e.target.value)).then(function (r) { return r.json(); })
        .then(function (r) { if (r.text !== undefined) { editor.value = r.text; numbers(); validate(); } });
    });
    document.getElementById("upload").addEventListener("change", function (e) {
      var file = e.target.files[0];
      if (!file) { return; }
      if (file.size > 256 * 1024) { show({ok: false, message: file.name + ": over 256 KiB; a config is a short file"}); return; }
      file.text().then(function (t) { editor.value = t; numbers(); validate(); });
    });
    document.querySelectorAll("button.insert").forEach(function (b) {
      b.addEventListener("click", function () {
        var at = editor.selectionStart, text = editor.value, start = text.lastIndexOf("\n", at - 1) + 1;
        var snippet = b.dataset.snippet + "\n";
        editor.value = text.slice(0, start) + snippet + text.slice(start);
        editor.focus(); editor.selectionStart = editor.selectionEnd = start + snippet.length;
        numbers(); later();
      });
    });
    document.getElementById("save").addEventListener("click", function () {
      post("/api/save", {yaml: editor.value, config_name: configName.value}).then(function (r) { side.textContent = r.message; });
    });
    document.getElementById("inspect").addEventListener("click", function () {
      side.textContent = "counting (tuneforge inspect) …";
      post("/api/inspect", {yaml: editor.value}).then(function (r) {
        if (!r.ok) { side.textContent = r.message; return; }
        var parts = Object.keys(r.trainable_by_strategy).map(function (k) { return k + ": " + r.trainable_by_strategy[k].toLocaleString("en"); });
        side.textContent = "trainable " + r.trainable_params.toLocaleString("en") + " of " + r.total_params.toLocaleString("en") +
          " parameters (" + (100 * r.trainable_params / r.total_params).toFixed(3) + "%)" + (parts.length ? "; " + parts.join(", ") : "");
        side.id = "side-result"; side.dataset.trainable = r.trainable_params;
      });
    });
    document.getElementById("start").addEventListener("click", function () {
      side.textContent = "starting …";
      post("/api/start", {yaml: editor.value, config_name: configName.value, run_name: runName.value}).then(function (r) {
        if (!r.ok) { show(r); side.textContent = r.message; return; }
        location.href = r.url;
      });
    });
    command(); numbers(); validate();
  }

  if (page === "chat") {
    document.getElementById("chat-send").addEventListener("click", function () {
      var status = document.getElementById("chat-status"), button = document.getElementById("chat-send");
      button.disabled = true; status.textContent = "generating with the base model and the run's adapter …";
      post("/api/chat", {run: document.getElementById("chat-run").value, text: document.getElementById("chat-prompt").value,
        max_new_tokens: document.getElementById("chat-tokens").value}).then(function (r) {
        button.disabled = false;
        if (!r.ok) { status.textContent = r.message; return; }
        status.textContent = "";
        document.getElementById("chat-base").textContent = r.base;
        document.getElementById("chat-tuned").textContent = r.tuned;
      });
    });
  }
})();
