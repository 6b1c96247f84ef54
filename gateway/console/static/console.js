// The live event feed: server-sent events appended to the table. EventSource reconnects
// by itself and sends Last-Event-ID, so the server resumes after the last event seen.
(function () {
  "use strict";
  const table = document.querySelector("table[data-stream]");
  if (!table) return;
  const body = table.querySelector("tbody");
  const status = document.querySelector("[data-live-status]");
  const after = table.getAttribute("data-last-seq") || "0";
  const source = new EventSource(table.getAttribute("data-stream") + "?after=" + encodeURIComponent(after));
  const ROWS_MAX = 200;

  function cell(text, className) {
    const td = document.createElement("td");
    if (className) td.className = className;
    td.textContent = text;
    return td;
  }

  function link(href, text) {
    const a = document.createElement("a");
    a.href = href;
    a.className = "mono";
    a.textContent = text;
    return a;
  }

  source.addEventListener("open", function () {
    status.textContent = "live";
    status.classList.add("on");
  });
  source.addEventListener("error", function () {
    status.textContent = "reconnecting…";
    status.classList.remove("on");
  });
  source.addEventListener("engine", function (message) {
    const event = JSON.parse(message.data);
    if (body.querySelector('tr[data-seq="' + event.seq + '"]')) return;
    const row = document.createElement("tr");
    row.setAttribute("data-seq", String(event.seq));
    row.className = "fresh";
    row.appendChild(cell(String(event.seq), "num mono"));
    row.appendChild(cell(event.at, "nowrap hide-s"));
    const type = document.createElement("td");
    const badge = document.createElement("span");
    badge.className = "etype etype-" + event.type.replace(/\./g, "-");
    badge.textContent = event.type;
    type.appendChild(badge);
    const time = document.createElement("div");  // a phone shows the time under the type
    time.className = "muted small show-s";
    time.textContent = event.at;
    type.appendChild(time);
    row.appendChild(type);
    row.appendChild(cell(event.summary));
    const where = cell("", "hide-s");
    if (event.account_id) where.appendChild(link("/console/accounts/" + encodeURIComponent(event.account_id), event.account_short));
    else if (event.portfolio_id) where.appendChild(link("/console/portfolios/" + encodeURIComponent(event.portfolio_id), event.portfolio_short));
    row.appendChild(where);
    body.insertBefore(row, body.firstChild);
    while (body.rows.length > ROWS_MAX) body.deleteRow(body.rows.length - 1);
    const empty = document.querySelector("[data-empty]");
    if (empty) empty.remove();
  });
})();
