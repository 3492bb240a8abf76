// The console's behaviour: live queue updates over Server-Sent Events, KB and ops panels.
// Everything from the server is inserted as text (textContent), never as markup.
"use strict";

(function () {
  const body = document.body;
  const live = body.dataset.live;
  let known = new Set();
  let refreshTimer = null;

  function rememberRows() {
    const rows = document.querySelectorAll("#queue tr[data-ticket]");
    const fresh = known.size > 0;
    rows.forEach(function (row) {
      if (fresh && !known.has(row.dataset.ticket)) row.classList.add("fresh");
    });
    known = new Set(Array.from(rows, function (row) { return row.dataset.ticket; }));
  }

  function refreshQueue() {
    const queue = document.getElementById("queue");
    if (!queue || !window.htmx) return;
    const url = queue.dataset.refresh;
    htmx.ajax("GET", url, { target: "#queue", swap: "outerHTML", headers: { "X-Loket-Refresh": url } });
  }

  // A live refresh answered after the agent changed the filters carries the old filters:
  // drop it rather than put back the list the agent just left.
  body.addEventListener("htmx:beforeSwap", function (event) {
    const config = event.detail.requestConfig;
    const asked = config && config.headers && config.headers["X-Loket-Refresh"];
    if (!asked) return;
    const queue = document.getElementById("queue");
    if (!queue || queue.dataset.refresh !== asked) event.detail.shouldSwap = false;
  });

  function scheduleRefresh() {
    if (refreshTimer) return;
    refreshTimer = setTimeout(function () { refreshTimer = null; refreshQueue(); }, 300);
  }

  function onEvent(event) {
    let data = {};
    try { data = JSON.parse(event.data || "{}"); } catch (e) { data = {}; }
    if (live === "queue") scheduleRefresh();
    if (live === "ticket" && String(data.ticket_id) === body.dataset.ticketId) {
      const note = document.getElementById("live-note");
      if (note) note.hidden = false;
    }
  }

  if (live && window.EventSource) {
    if (live === "queue") {
      rememberRows();
      body.addEventListener("htmx:afterSwap", rememberRows);
    }
    const source = new EventSource("/events/stream");
    // "ready" comes on every (re)connection: fetch what arrived while not connected.
    source.addEventListener("ready", function () { if (live === "queue") scheduleRefresh(); });
    source.addEventListener("message", onEvent);
    window.addEventListener("beforeunload", function () { source.close(); });
  }

  function text(tag, value, className) {
    const element = document.createElement(tag);
    element.textContent = value;
    if (className) element.className = className;
    return element;
  }

  function loadJson(panel, render) {
    fetch(panel.dataset.url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) { if (!response.ok) throw new Error(response.status); return response.json(); })
      .then(function (data) {
        Array.from(panel.children).forEach(function (child) { if (child.tagName !== "H2") child.remove(); });
        panel.appendChild(render(data));
      })
      .catch(function () { panel.hidden = true; });
  }

  const kb = document.getElementById("kb");
  if (kb) {
    loadJson(kb, function (data) {
      const articles = Array.isArray(data) ? data : (data.articles || data.results || data.items || []);
      const list = document.createElement("ul");
      list.className = "plain kb-list";
      articles.slice(0, 5).forEach(function (article) {
        const item = document.createElement("li");
        item.appendChild(text("strong", article.problem || article.title || ""));
        item.appendChild(text("p", article.solution || "", "pre"));
        list.appendChild(item);
      });
      if (!articles.length) list.appendChild(text("li", kb.dataset.empty || "–"));
      return list;
    });
  }
})();
