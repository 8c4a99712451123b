/* Starling dashboard: live updates over Server-Sent Events (GET /dashboard/events).
 * No framework, no build step. Every value arrives pre-formatted from the server and is set with
 * textContent (never innerHTML), so peer-supplied strings cannot inject markup. */
(function () {
  "use strict";
  var body = document.body;
  var base = body.getAttribute("data-base") || "/dashboard";
  var live = body.getAttribute("data-live");
  var statusEl = document.getElementById("live-status");
  var PATHS = ["direct", "relayed", "connecting", "idle", "lost"];
  var RANK = { direct: 0, relayed: 1, connecting: 2, idle: 3, lost: 4 };
  var SYMBOL = { direct: "D", relayed: "R", connecting: "C", idle: "I", lost: "L", none: "?", blocked: "\u00b7", self: "\u2014" };
  var WORD = { direct: "direct", relayed: "relayed", connecting: "connecting", idle: "idle", lost: "lost",
               none: "allowed, not reported", blocked: "not allowed by policy", self: "self" };
  var since = parseFloat(body.getAttribute("data-since") || "0") || 0;
  var updates = 0;
  var failures = 0;
  var source = null;

  function knownPath(p) { return Object.prototype.hasOwnProperty.call(RANK, p) ? p : "idle"; }
  function q(sel, root) { return (root || document).querySelector(sel); }
  function qa(sel, root) { return Array.prototype.slice.call((root || document).querySelectorAll(sel)); }
  function attr(name, value) { return "[" + name + '="' + (window.CSS && CSS.escape ? CSS.escape(value) : value) + '"]'; }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined) { e.textContent = text; }
    return e;
  }
  function setStatus(state, text) {
    if (!statusEl) { return; }
    statusEl.setAttribute("data-state", state);
    statusEl.textContent = text;
  }
  function flash(node) {
    if (!node) { return; }
    node.classList.remove("flash");
    void node.offsetWidth; // restart the animation
    node.classList.add("flash");
  }
  function showNotice() {
    var n = document.getElementById("new-peers");
    if (n) { n.hidden = false; }
  }

  // ----- pieces ------------------------------------------------------------------------------
  function timeNode(text, isoValue) {
    if (!isoValue) { return document.createTextNode(text); }
    var t = el("time", "", text);
    t.setAttribute("datetime", isoValue);
    return t;
  }
  function pathNode(p) { p = knownPath(p); return el("span", "path path-" + p, p); }
  function connRow(c) {
    var tr = el("tr");
    var th = el("th");
    th.setAttribute("scope", "row");
    var a = el("a", "", c.peer_name);
    a.href = base + "/peers/" + encodeURIComponent(c.peer_id);
    th.appendChild(a);
    tr.appendChild(th);
    var td = el("td"); td.appendChild(pathNode(c.path)); tr.appendChild(td);
    tr.appendChild(el("td", "num", c.latency));
    td = el("td"); td.appendChild(timeNode(c.handshake, c.handshake_iso)); tr.appendChild(td);
    tr.appendChild(el("td", "num", c.rx));
    tr.appendChild(el("td", "num", c.tx));
    return tr;
  }
  function setOnline(scope, online) {
    scope.setAttribute("data-online", online ? "1" : "0");
    qa('[data-role="status"]', scope).forEach(function (s) {
      s.classList.toggle("status-online", online);
      s.classList.toggle("status-offline", !online);
      var t = q('[data-role="status-text"]', s);
      if (t) { t.textContent = online ? "online" : "offline"; }
    });
  }

  // ----- one changed peer ----------------------------------------------------------------------
  function updatePeer(p) {
    var found = false;
    qa(attr("data-peer", p.id)).forEach(function (scope) {
      found = true;
      var was = scope.getAttribute("data-online");
      setOnline(scope, p.connected);
      var seen = q('[data-role="last-seen"]', scope);
      if (seen) { seen.textContent = ""; seen.appendChild(timeNode(p.last_seen, p.last_seen_iso)); }
      var rep = q('[data-role="reported"]', scope);
      if (rep) { rep.textContent = p.reported_at; }
      var sum = q('[data-role="summary"]', scope);
      if (sum) { sum.textContent = p.summary; }
      var tbody = q("[data-conns]", scope);
      if (tbody && p.connections) {
        tbody.textContent = "";
        p.connections.forEach(function (c) { tbody.appendChild(connRow(c)); });
      }
      var more = q('[data-role="more"]', scope);
      if (more) {
        more.hidden = !p.more;
        var count = q('[data-role="more-count"]', more);
        if (count) { count.textContent = String(p.more); }
      }
      if (was !== (p.connected ? "1" : "0")) { flash(scope); }
    });
    updateMesh(p);
    return found;
  }

  // ----- mesh view -------------------------------------------------------------------------------
  function cellPath(a, b) {
    var c = q(attr("data-row", a) + attr("data-col", b));
    return c ? c.getAttribute("data-path") : null;
  }
  function best(x, y) {
    var found = [x, y].filter(function (p) { return p && Object.prototype.hasOwnProperty.call(RANK, p); });
    if (!found.length) { return "none"; }
    found.sort(function (m, n) { return RANK[m] - RANK[n]; });
    return found[0];
  }
  function updateMesh(p) {
    var node = q("g" + attr("data-node", p.id));
    if (node) {
      node.classList.toggle("node-online", p.connected);
      node.classList.toggle("node-offline", !p.connected);
    }
    qa("td" + attr("data-row", p.id)).forEach(function (cell) {
      var col = cell.getAttribute("data-col");
      if (col === p.id) { return; } // the diagonal
      var allowed = cell.getAttribute("data-allowed") === "1";
      var state = p.paths[col] ? knownPath(p.paths[col]) : (allowed ? "none" : "blocked");
      if (cell.getAttribute("data-path") !== state) {
        cell.setAttribute("data-path", state);
        cell.className = "cell cell-" + state;
        cell.textContent = "";
        var sym = el("span", "", SYMBOL[state]);
        sym.setAttribute("aria-hidden", "true");
        cell.appendChild(sym);
        cell.appendChild(el("span", "sr-only", WORD[state]));
        flash(cell);
      }
    });
    qa("line" + attr("data-a", p.id) + ", line" + attr("data-b", p.id)).forEach(function (line) {
      var a = line.getAttribute("data-a");
      var b = line.getAttribute("data-b");
      line.setAttribute("class", "edge edge-" + best(cellPath(a, b), cellPath(b, a)));
    });
    var rows = qa("tr" + attr("data-from", p.id));
    var seen = {};
    var byPeer = {};
    (p.connections || []).forEach(function (c) { byPeer[c.peer_id] = c; });
    rows.forEach(function (tr) {
      var to = tr.getAttribute("data-to");
      seen[to] = true;
      var cell = q('[data-role="path"]', tr);
      var path = p.paths[to];
      if (cell) {
        cell.textContent = "";
        if (path) { cell.appendChild(pathNode(path)); } else { cell.appendChild(el("span", "path path-idle", "not reported")); }
      }
      var c = byPeer[to];
      if (c) {
        ["latency", "handshake", "rx", "tx"].forEach(function (k) {
          var td = q('[data-role="' + k + '"]', tr);
          if (td) { td.textContent = c[k]; }
        });
      }
    });
    if (rows.length && Object.keys(p.paths).some(function (to) { return !seen[to]; })) { showNotice(); }
  }

  // ----- messages ---------------------------------------------------------------------------------
  function apply(msg) {
    var online = document.getElementById("online-count");
    var total = document.getElementById("peer-count");
    if (online) { online.textContent = String(msg.online); }
    if (total) { total.textContent = String(msg.total); }
    var added = {};
    (msg.added || []).forEach(function (id) { added[id] = true; });
    msg.peers.forEach(function (p) {
      var shown = updatePeer(p);
      if (!shown && added[p.id] && (live === "peers" || live === "mesh")) { showNotice(); }
    });
    (msg.removed || []).forEach(function (id) {
      qa(attr("data-peer", id)).forEach(function (scope) {
        scope.classList.add("removed");
        qa('[data-role="status-text"]', scope).forEach(function (t) { t.textContent = "removed"; });
        showNotice();
      });
    });
    updates += 1;
    body.setAttribute("data-live-updates", String(updates));
    setStatus("live", "Live \u00b7 updated " + new Date().toLocaleTimeString());
  }

  function connect() {
    var url = base + "/events" + (since ? "?since=" + encodeURIComponent(since.toFixed(3)) : "");
    source = new EventSource(url);
    source.addEventListener("open", function () {
      failures = 0;
      setStatus("live", "Live updates on");
    });
    source.addEventListener("peers", function (ev) {
      var msg;
      try { msg = JSON.parse(ev.data); } catch (e) { return; }
      if (typeof msg.time === "number") { since = msg.time; }
      apply(msg);
    });
    source.addEventListener("resync", function () { window.location.reload(); });
    source.addEventListener("logout", function () {
      source.close();
      window.location.assign(base + "/login?next=" + encodeURIComponent(window.location.pathname + window.location.search));
    });
    source.addEventListener("error", function () {
      source.close();
      failures += 1;
      setStatus("error", "Live updates interrupted: reconnecting\u2026");
      window.setTimeout(connect, Math.min(30000, 1000 * Math.pow(2, failures)));
    });
  }

  // ----- rows of the peers list load their connections when opened ---------------------------------
  function loadConnections(details) {
    if (!details.open || details.getAttribute("data-loaded")) { return; }
    details.setAttribute("data-loaded", "loading");
    var target = q('[data-role="conns-body"]', details);
    window.fetch(details.getAttribute("data-lazy"), { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(new Error(String(r.status))); })
      .then(function (text) {
        var doc = new DOMParser().parseFromString(text, "text/html");
        var fragment = q('[data-role="conns-fragment"]', doc);
        if (!fragment || !target) { throw new Error("unexpected response"); }
        target.textContent = "";
        target.appendChild(document.importNode(fragment, true));
        details.setAttribute("data-loaded", "yes");
      })
      .catch(function () { details.removeAttribute("data-loaded"); });
  }
  qa("details[data-lazy]").forEach(function (d) {
    d.addEventListener("toggle", function () { loadConnections(d); });
  });

  if (live && window.EventSource) { connect(); }
})();
