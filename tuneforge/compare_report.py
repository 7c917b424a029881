"""The comparison report as Markdown, as one self-contained HTML page (sortable table, figures inlined,
no network needed), and as plain text for the terminal."""

from __future__ import annotations

import base64
import html
import re

from tuneforge.compare_summary import COST_WORDS, cost_text
from tuneforge.compare_table import FRONT_MARK, table
from tuneforge.formatting import change_cell, decimals_for, fixed, percent
from tuneforge.report import continual_section


def _get(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def fairness_line(differences: list[str], configs: dict[str, dict], seeds: int) -> str:
    if differences:
        return "**Not a like-for-like comparison:** " + "; ".join(differences) + "."
    first = next(iter(configs.values()))
    steps = _get(first, "train.max_steps") or f"{_get(first, 'train.epochs')} epoch(s)"
    used = sorted({_get(c, "train.seed") or 0 for c in configs.values()})
    seed_text = f"seeds ({', '.join(map(str, used))})" if seeds > 1 else f"seed ({used[0]})"
    return (f"Fair comparison: same model, data, retain set, {seed_text}, batch size "
            f"({_get(first, 'train.batch_size')}), "
            f"max_seq_len ({_get(first, 'train.max_seq_len')}) and budget "
            f"({steps} steps) for every trained run; prompt-only rows train nothing.")


def before_line(rows: list[dict]) -> str:
    """The model before training, when every row starts from the same numbers (else the table shows them)."""
    task, retain = {row["task_before"] for row in rows}, {row["retain_ppl_before"] for row in rows}
    if len(task) != 1 or len(retain) != 1 or None in task:
        return ""
    metric, row = rows[0]["task_metric"], rows[0]
    decimals = decimals_for(task, 4)
    spread = row["spread"].get("task_before")
    over_seeds = (f" ± {fixed(spread, decimals)} (each seed draws its own held-out split)"
                  if spread else "")
    retain_text = (f", retain perplexity {fixed(row['retain_ppl_before'], decimals_for(retain, 4))}"
                   if None not in retain else "")
    return f"Before training: task {metric} {fixed(row['task_before'], decimals)}{over_seeds}{retain_text}."


def legend(report: dict) -> str:
    """What the table's marks and columns mean."""
    rows, seeds = report["rows"], report["summary"]["seeds"]
    metric = rows[0]["task_metric"]
    spread = (f"± is the standard deviation over {seeds} seeds (the cost columns show the mean). "
              if seeds > 1 else "")
    task = (f"eval {metric} (higher is better)" if metric != "loss"
            else "eval loss, the mean token cross-entropy on held-out answers (lower is better)")
    return (f"{FRONT_MARK} on the Pareto front of task gain, forgetting and {COST_WORDS[report['cost']]}; "
            "**bold**: best in its column among trained runs; ↓/↑: lower/higher is better. " + spread +
            f"Task: {task}. Changes are after minus before, then relative to before in %. Forgetting: the "
            "change in retain-set perplexity (original-domain text the runs did not train on). Artifact: "
            "the saved adapter (or trained weights). Time and throughput: training steps only.")


def budget_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """The 'pick by budget' table: the front's trained runs, cheapest first."""
    guide, cost = report["summary"]["budget"], report["cost"]
    metric = report["rows"][0]["task_metric"]
    decimals = decimals_for([g["task_change"] for g in guide], 4)
    header = [f"{COST_WORDS[cost]} up to", "pick", f"task {metric} change (relative)",
              "forgetting (retain ppl change)"]
    return header, [[cost_text(g["cost"], cost), g["run"],
                     change_cell(g["task_change"], g["task_change_pct"], decimals),
                     percent(g["forgetting_pct"])] for g in guide]


def _md_table(header: list[str], rows: list[list[str]], numeric_from: int = 1) -> list[str]:
    align = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |",
            *("| " + " | ".join(row) + " |" for row in rows)]


def render_markdown(report: dict, plots, configs: dict[str, dict], continual: dict | None = None) -> str:
    summary = report["summary"]
    lines = ["# tuneforge comparison", "", f"**Summary.** {summary['text']}", "",
             fairness_line(report["differences"], configs, summary["seeds"]), ""]
    if before_line(report["rows"]):
        lines += [before_line(report["rows"]), ""]
    if summary["budget"]:
        lines += ["## Pick by budget", "", *_md_table(*budget_rows(report), numeric_from=2), ""]
    shown, cells = table(report["rows"])
    body = [[f"**{c.text}**" if c.best else c.text for c in row] for row in cells]
    lines += ["## Results", "", *_md_table([c.header for c in shown], body, numeric_from=2), "",
              legend(report), "", "## Figures", ""]
    for number, plot in enumerate(plots, 1):
        lines += [f"![{plot.title}]({plot.path.name})", "", f"*Figure {number}. {plot.caption}*", ""]
    for name, result in (continual or {}).items():  # sequence runs: each one's task x task matrix
        lines += continual_section(result, f"Continual learning: {name}")
    if report.get("command"):
        lines += ["", f"Made with `{report['command']}` on {report['date']}."]
    return "\n".join(lines) + "\n"


def _inline(markdown: str) -> str:
    """Escaped text with Markdown's **bold** and `code` turned into HTML."""
    text = html.escape(markdown)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def continual_html(name: str, continual: dict) -> str:
    """One sequence run's R matrix as an HTML table, with ACC/BWT/FWT."""
    lines = continual_section(continual, f"Continual learning: {name}")
    rows = [line for line in lines if line.startswith("| ") and "---" not in line]
    cells = [[c.strip() for c in row.strip("|").split(" | ")] for row in rows]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cells[0])
    body = "".join("<tr><th>" + html.escape(r[0]) + "</th>" + "".join(f"<td>{html.escape(c)}</td>"
                                                                       for c in r[1:]) + "</tr>"
                   for r in cells[1:])
    sentence = next(line for line in lines if line.startswith("R[i][j]"))
    return (f"<h2>Continual learning: {html.escape(name)}</h2><p>{_inline(sentence)}</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            f"<p>{_inline(lines[-1])}</p>")


STYLE = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1500px;
padding:0 16px;color:#1a1a1a}
h1{margin-bottom:.3em}.summary{background:#eef5fb;border-left:5px solid #0072B2;padding:10px 16px;
font-size:16px}
table{border-collapse:collapse;margin:.6em 0;font-variant-numeric:tabular-nums}
td,th{border:1px solid #c8c8c8;padding:4px 6px;text-align:right;white-space:nowrap;font-size:13px}
td:first-child,th:first-child,td.text,th.text{text-align:left}td.text{white-space:normal}td:first-child{white-space:nowrap}
thead th{background:#f2f2f2;vertical-align:bottom;white-space:normal;min-width:4em}
th.sortable{cursor:pointer}th.sortable:after{content:" ⇅";color:#888}
th[aria-sort=ascending]:after{content:" ▲";color:#000}th[aria-sort=descending]:after{content:" ▼";color:#000}
td.best{font-weight:700;background:#fff3cd}tr.front td:first-child{font-weight:700}
.legend{font-size:13px;color:#444;max-width:1100px}
figure{margin:1.2em 0}figure img{max-width:100%;height:auto;border:1px solid #ddd}
figcaption{font-size:14px;color:#333;max-width:900px}
.figures{display:grid;grid-template-columns:repeat(auto-fit,minmax(820px,1fr));gap:0 24px}
code{background:#f4f4f4;padding:0 3px}
"""

# Click a header to sort by it (again to reverse); cells sort by their data-value, missing values last.
SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th.sortable").forEach(function (th, column) {
    th.addEventListener("click", function () {
      var ascending = th.getAttribute("aria-sort") !== "ascending";
      table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[column].dataset.value, y = b.cells[column].dataset.value;
        if (x === "" || y === "") { return (x === "") - (y === ""); }
        var nx = parseFloat(x), ny = parseFloat(y);
        var order = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
        return ascending ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def results_table_html(report: dict) -> str:
    shown, cells = table(report["rows"])
    head = "".join(f'<th class="sortable{" text" if c.kind == "text" else ""}" title="click to sort">'
                   f"{html.escape(c.header)}</th>" for c in shown)
    body = []
    for row, row_cells in zip(report["rows"], cells):
        tds = []
        for column, cell in zip(shown, row_cells):
            value = cell.value if not isinstance(cell.value, float) else f"{cell.value:.8g}"
            value = "" if value is None else html.escape(str(value))
            marks = ("best" if cell.best else "", "text" if column.kind == "text" else "")
            classes = " ".join(mark for mark in marks if mark)
            tds.append(f'<td data-value="{value}"' + (f' class="{classes}"' if classes else "")
                       + f">{html.escape(cell.text)}</td>")
        body.append(f'<tr{" class=front" if row.get("pareto") else ""}>' + "".join(tds) + "</tr>")
    return (f'<table class="sortable" id="results"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def render_html(report: dict, plots, configs: dict[str, dict], continual: dict | None = None) -> str:
    summary = report["summary"]
    parts = ["<h1>tuneforge comparison</h1>",
             f'<p class="summary"><b>Summary.</b> {_inline(summary["text"])}</p>',
             (f"<p>{_inline(fairness_line(report['differences'], configs, summary['seeds']))} "
             f"{_inline(before_line(report['rows']))}</p>")]
    if summary["budget"]:
        header, rows = budget_rows(report)
        parts.append("<h2>Pick by budget</h2><table><thead><tr>"
                     + "".join(f"<th{' class=text' if i == 1 else ''}>{html.escape(h)}</th>"
                               for i, h in enumerate(header)) + "</tr></thead><tbody>"
                     + "".join("<tr>" + "".join(f"<td{' class=text' if i == 1 else ''}>{html.escape(c)}</td>"
                                                for i, c in enumerate(row)) + "</tr>"
                               for row in rows) + "</tbody></table>")
    parts += ["<h2>Results</h2>", results_table_html(report),
              f'<p class="legend">{_inline(legend(report))}</p>', '<h2>Figures</h2><div class="figures">']
    for number, plot in enumerate(plots, 1):
        data = base64.b64encode(plot.path.read_bytes()).decode()
        parts.append(f'<figure><img alt="{html.escape(plot.title)}" src="data:image/png;base64,{data}">'
                     f"<figcaption><b>Figure {number}.</b> {_inline(plot.caption)}</figcaption></figure>")
    parts.append("</div>")
    parts += [continual_html(name, result) for name, result in (continual or {}).items()]
    if report.get("command"):
        parts.append(f"<p class=legend>Made with <code>{html.escape(report['command'])}</code> "
                     f"on {html.escape(report['date'])}.</p>")
    return ("<!doctype html><html lang=en><head><meta charset='utf-8'>"
            "<meta name=viewport content='width=device-width,initial-scale=1'>"
            f"<title>tuneforge comparison</title><style>{STYLE}</style></head><body>"
            + "".join(parts) + f"<script>{SORT_SCRIPT}</script></body></html>\n")


def console_comparison(report: dict) -> str:
    """The summary and a narrower table for the terminal."""
    shown, cells = table(report["rows"], terminal=True)
    grid = [[c.header for c in shown], *[[c.text for c in row] for row in cells]]
    widths = [max(len(row[i]) for row in grid) for i in range(len(shown))]
    lines = ["  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                       for i, cell in enumerate(row)) for row in grid]
    summary = re.sub(r"\*\*(.+?)\*\*", r"\1", report["summary"]["text"]).replace("`", "")
    return "\n".join([summary, "", *lines, "", f"{FRONT_MARK} on the Pareto front"])
