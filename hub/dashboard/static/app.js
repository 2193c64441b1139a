// fedge fleet dashboard: polls api/state every 2 s and renders it. No dependencies, no network beyond the hub.
// Every value from the store is set with textContent (never parsed as HTML).
"use strict";

(function () {
  const POLL_MS = 2000;
  const SVG = "http://www.w3.org/2000/svg";
  const COLORS = { hub: "#2457c5", val_acc_global: "#c2410c", val_acc_personal: "#15803d",
    val_acc_local_only: "#7c3aed" };
  const EXTRA = ["#0e7490", "#be185d", "#4d7c0f", "#92400e"];
  const token = new URLSearchParams(window.location.search).get("token");
  const headers = token ? { Authorization: "Bearer " + token } : {};

  function el(tag, props, children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === undefined || v === null) continue;
      if (k === "text") node.textContent = String(v);
      else if (k === "className") node.className = v;
      else node.setAttribute(k, String(v));
    }
    for (const child of children || []) node.appendChild(child);
    return node;
  }

  function svg(tag, attrs, children) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = String(v);
      else node.setAttribute(k, String(v));
    }
    for (const child of children || []) node.appendChild(child);
    return node;
  }

  const dash = "—";
  const fixed = (x, digits) => (x === null || x === undefined ? dash : Number(x).toFixed(digits));
  const num = (x) => (x === null || x === undefined ? dash : String(x));
  const td = (text, className, value) => el("td", { text: text, className: className, "data-value": value });
  const pill = (text) => el("span", { className: "pill " + text, text: text });

  function ago(ts, now) {
    if (!ts) return dash;
    const s = Math.max(0, now - ts);
    if (s < 90) return Math.round(s) + " s ago";
    if (s < 5400) return Math.round(s / 60) + " min ago";
    if (s < 172800) return Math.round(s / 3600) + " h ago";
    return Math.round(s / 86400) + " d ago";
  }

  function fill(tbody, rows, columns, emptyText) {
    tbody.replaceChildren(...(rows.length ? rows : [el("tr", {}, [el("td", {
      text: emptyText, className: "empty", colspan: columns })])]));
  }

  function card(label, value, id) {
    return el("div", { className: "card", id: id }, [
      el("div", { className: "label", text: label }), el("div", { className: "value", text: value })]);
  }

  function renderSummary(s) {
    const online = s.devices.filter((d) => d.online).length;
    const done = s.rounds.filter((r) => r.status === "completed").length;
    const scored = s.rounds.filter((r) => r.accuracy !== null);
    const last = scored.length ? scored[scored.length - 1].accuracy : null;
    const cards = [
      card("devices online", online + " / " + s.devices.length, "card-online"),
      card("rounds completed", done + " / " + s.rounds.length, "card-rounds"),
      card("open round", s.open_round === null ? "none" : "#" + s.open_round, "card-open"),
      card("current model", s.current_version || dash, "card-model"),
      card("latest accuracy", fixed(last, 4), "card-accuracy"),
    ];
    if (s.privacy) {
      const budget = s.privacy.epsilon_budget ? " / " + fixed(s.privacy.epsilon_budget, 2) : "";
      cards.push(card("ε spent", fixed(s.privacy.epsilon_spent, 3) + budget, "card-epsilon"));
    }
    if (s.alert) {
      const alert = card("alert", s.alert, "card-alert");
      alert.className = "card alert";
      cards.push(alert);
    }
    document.getElementById("summary").replaceChildren(...cards);
  }

  // installed back-ends; one the device found unusable (probe or a crash in a round) is marked, its reason shown
  function backendsCell(d) {
    const faults = d.backend_faults || {};
    const names = (d.backends || []).map((b) => (faults[b] ? b + " (unusable: " + faults[b] + ")" : b));
    return td(names.join(", ") || dash, Object.keys(faults).length ? "backends faulty" : "backends");
  }

  function declinesCell(d) {
    const last = d.last_decline;
    const cell = td(num(d.declines), "num declines");
    if (last) cell.title = "last: round " + last.round + ", " + last.reason + (last.detail ? " (" + last.detail + ")" : "");
    return cell;
  }

  function renderDevices(s) {
    const rows = s.devices.map((d) => el("tr", { "data-device": d.device }, [
      td(d.device, "device"),
      el("td", {}, [pill(d.online ? "online" : "offline")]),
      el("td", { text: ago(d.last_seen, s.generated_at),
        title: d.last_seen ? new Date(d.last_seen * 1000).toISOString() : "" }),
      td(d.model_version || dash, "model"),
      td(d.trainer || dash, "trainer"),
      backendsCell(d),
      td(num(d.n_samples), "num"), td(num(d.rounds), "num"), td(num(d.last_round), "num"),
      declinesCell(d), td(num(d.rejects), "num"),
    ]));
    document.getElementById("device-count").textContent = "(" + s.devices.length + ")";
    fill(document.querySelector("#devices tbody"), rows, 11, "no device has said hello yet");
  }

  function renderRounds(s) {
    const rows = s.rounds.slice().reverse().map((r) => el("tr", { "data-round": r.id }, [
      td(String(r.id), "num round-id"),
      el("td", {}, [pill(r.status)]),
      td(r.model_version || dash), td(r.new_version || dash),
      td(num(r.cohort), "num"), td(num(r.devices), "num"), td(num(r.declined), "num"),
      td(num(r.rejected), "num"), td(num(r.n_samples), "num"),
      td(fixed(r.accuracy, 4), "num accuracy", r.accuracy), td(fixed(r.loss, 4), "num"),
      td(fixed(r.seconds, 2), "num"), td(fixed(r.epsilon, 3), "num"),
      td(r.detail || "", "detail"),
    ]));
    document.getElementById("round-count").textContent = "(" + s.rounds.length + ")";
    fill(document.querySelector("#rounds tbody"), rows, 14, "no round yet");
  }

  function renderCounts(id, counts, emptyText) {
    const rows = Object.entries(counts).sort((a, b) => b[1] - a[1]).map(([reason, n]) =>
      el("tr", { "data-reason": reason }, [td(reason), td(String(n), "num")]));
    fill(document.querySelector("#" + id + " tbody"), rows, 2, emptyText);
  }

  function renderPrivacy(s) {
    const section = document.getElementById("privacy");
    const p = s.privacy;
    section.hidden = !p;
    if (!p) return;
    const budget = p.epsilon_budget ? " of a budget of " + fixed(p.epsilon_budget, 2) : " (no budget set)";
    document.getElementById("privacy-summary").textContent = p.mode + " differential privacy: ε spent " +
      fixed(p.epsilon_spent, 3) + budget + " at δ = " + p.delta;
    const rows = p.rounds.slice().reverse().map((r) => el("tr", {}, [
      td(String(r.round), "num"), td(r.mode), td(fixed(r.noise_multiplier, 3), "num"), td(fixed(r.clip, 3), "num"),
      td(fixed(r.sample_rate, 3), "num"), td(r.amplified ? "yes" : "no"), td(num(r.cohort), "num"),
      td(fixed(r.expected_cohort, 1), "num"), td(fixed(r.epsilon, 3), "num"),
    ]));
    fill(document.querySelector("#ledger tbody"), rows, 9, "no DP round yet");
  }

  function renderAlerts(s) {
    const section = document.getElementById("alerts");
    const alerts = s.alerts || [], excluded = s.excluded || [];
    section.hidden = !alerts.length && !excluded.length;
    const rows = alerts.map((a) => el("tr", { "data-kind": a.kind }, [
      td(a.round === null ? dash : String(a.round), "num"), td(a.kind), td(a.device || dash), td(a.detail, "detail"),
    ]));
    fill(document.querySelector("#alert-list tbody"), rows, 4, "no alert");
    const out = excluded.map((d) => el("tr", { "data-device": d.device }, [
      td(d.device), td(d.permanent ? "for good (fedge hub devices readmit)" : String(d.until)),
      td(num(d.exclusions), "num"), td(d.reason, "detail"),
    ]));
    fill(document.querySelector("#excluded tbody"), out, 4, "no device excluded");
  }

  // The accuracy chart: one inline SVG, x = round id, y = accuracy in [0, 1].
  function renderChart(s) {
    const W = 1100, H = 320, L = 48, R = 16, T = 12, B = 36;
    const series = s.chart.series.filter((x) => x.points.length);
    const rounds = series.flatMap((x) => x.points.map((p) => p[0]));
    const root = svg("svg", { viewBox: "0 0 " + W + " " + H, role: "img", id: "accuracy-chart",
      "aria-label": "accuracy over rounds" });
    const x0 = rounds.length ? Math.min(...rounds) : 1, x1 = rounds.length ? Math.max(...rounds) : 1;
    const span = Math.max(x1 - x0, 1);
    const px = (r) => (x1 === x0 ? L + (W - L - R) / 2 : L + ((r - x0) / span) * (W - L - R));
    const py = (a) => T + (1 - a) * (H - T - B);
    for (const a of [0, 0.25, 0.5, 0.75, 1]) {
      root.appendChild(svg("line", { x1: L, x2: W - R, y1: py(a), y2: py(a), class: "grid" }));
      root.appendChild(svg("text", { x: L - 8, y: py(a) + 4, "text-anchor": "end", class: "tick", text: a.toFixed(2) }));
    }
    root.appendChild(svg("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
    root.appendChild(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
    const step = Math.max(1, Math.ceil(span / 12));
    for (let r = x0; r <= x1; r += step) {
      root.appendChild(svg("text", { x: px(r), y: H - B + 16, "text-anchor": "middle", class: "tick", text: r }));
    }
    root.appendChild(svg("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", class: "tick",
      text: "round" }));
    const legend = [];
    if (s.chart.source_accuracy !== null && s.chart.source_accuracy !== undefined) {
      const y = py(s.chart.source_accuracy);
      root.appendChild(svg("line", { x1: L, x2: W - R, y1: y, y2: y, class: "source", "data-series": "source" }));
      legend.push(el("li", { "data-series": "source" }, [el("span", { className: "swatch dashed" }),
        document.createTextNode("source model (v0): " + fixed(s.chart.source_accuracy, 4))]));
    }
    series.forEach((line, i) => {
      const color = COLORS[line.key] || EXTRA[i % EXTRA.length];
      const pts = line.points.map((p) => px(p[0]).toFixed(1) + "," + py(p[1]).toFixed(1)).join(" ");
      const g = svg("g", { class: "series", "data-series": line.key });
      g.appendChild(svg("polyline", { points: pts, class: "line", stroke: color }));
      for (const [r, a] of line.points) {
        g.appendChild(svg("circle", { cx: px(r), cy: py(a), r: 3.5, fill: color, "data-round": r, "data-value": a },
          [svg("title", { text: line.name + ", round " + r + ": " + Number(a).toFixed(4) })]));
      }
      root.appendChild(g);
      const swatch = el("span", { className: "swatch" });
      swatch.style.background = color;
      legend.push(el("li", { "data-series": line.key }, [swatch, document.createTextNode(line.name)]));
    });
    if (!series.length) {
      root.appendChild(svg("text", { x: (L + W - R) / 2, y: (T + H - B) / 2, "text-anchor": "middle",
        class: "empty-note", text: "no scored round yet" }));
    }
    document.getElementById("chart").replaceChildren(root);
    document.getElementById("legend").replaceChildren(...legend);
  }

  function render(s) {
    document.getElementById("fleet").textContent = s.fleet;
    document.title = "fedge · " + s.fleet;
    renderSummary(s);
    renderChart(s);
    renderDevices(s);
    renderRounds(s);
    renderCounts("rejects", s.rejects, "nothing rejected");
    renderCounts("declines", s.declines, "nothing declined");
    renderPrivacy(s);
    renderAlerts(s);
  }

  function setStatus(state, text) {
    const node = document.getElementById("status");
    node.dataset.state = state;
    node.textContent = text;
  }

  async function refresh() {
    try {
      const res = await fetch("api/state", { cache: "no-store", credentials: "same-origin", headers: headers });
      if (!res.ok) throw new Error("HTTP " + res.status);
      const state = await res.json();
      render(state);
      const when = new Date(state.generated_at * 1000).toLocaleTimeString();
      setStatus("live", state.store ? "live · " + when : "waiting for the hub's store · " + when);
    } catch (err) {
      setStatus("error", "cannot reach the hub (" + err.message + "), retrying");
    } finally {
      window.setTimeout(refresh, POLL_MS);
    }
  }

  refresh();
})();
