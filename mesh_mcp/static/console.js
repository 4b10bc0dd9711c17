// mesh-llm console: one buildless ES module (no framework, nothing fetched from the internet).
// Everything comes from GET /api/status (once; the only source of the invite token) and the `status`
// events of GET /api/events (re-rendered on each; reconnects on error). Chat: POST /api/chat (OpenAI SSE);
// blackboard: GET/POST /api/blackboard. Model output and every string from the mesh reach the page through
// textContent / text nodes (markdown.js builds DOM nodes, never HTML).
//
// ELEMENT CONTRACT for the browser tests (stable; change only together with the tests):
//   header    #node-name (this node's name · id), #conn[data-state="connecting"|"live"|"reconnecting"]
//   topology  #topology svg#topology-svg
//             g.node[data-node-id][data-name][data-role][data-state]    one per member or client
//             g.node.self (this node), g.node.dead / g.node.left (fading out over 60 s; style.opacity falls)
//             g.node text.name, text.id (first 8 chars of the id), text.badge (role)
//             line.link[data-a][data-b][data-rtt]  class ok (< 40 ms) | warn (< 80) | over (>= 80) | unknown
//             path.hull[data-model][data-mode="split"|"shards"]        a model spread over several nodes
//             #topology-groups li.group[data-model][data-mode]         the same groups, named, under the drawing
//             #topology-summary                                         "N members · M links"
//   capacity  #capacity .bar[data-node-id][data-capacity]  .seg[data-model][data-bytes][data-stage="first-last"?]
//             .seg.free[data-bytes]   (a split's host and workers hold their stage's share of the model)
//   models    #models tr[data-model][data-state][data-mode]  td.state, td.where (stages: li.stage[data-node-id]
//             with the layer range; shards: li.shard[data-node-id][data-experts]; .failed-on), td.ctx, td.tools,
//             td.thinks ("yes": a thinking model, thinking off unless a request asks), td.toks ("N predicted, M measured" tok/s), td.demand,
//             td.live[data-in-flight][data-ok][data-errors] (requests that entered this node: status.requests)
//             "N in flight · N ok · N errors" (empty when none came here);
//             a failure adds tr.failed and its detail in .detail
//   chat      select#chat-model (option[value] = every model a node serves), input#chat-max-tokens, textarea#chat-input,
//             button#chat-send, button#chat-stop, button#chat-regen, button#chat-clear,
//             #chat-log .msg.user, .msg.assistant[data-state="streaming"|"done"|"stopped"|"error"]
//             .msg.assistant .body (rendered answer), .msg.assistant button.copy
//   board     #board-feed .post[data-post-id] (.text, .meta), input#board-q, button#board-search-btn,
//             textarea#board-text, button#board-post, p#board-error (the server's sentence on a 4xx),
//             #board-status (e.g. "this node does not carry the blackboard")
//   join      section#join (hidden unless /api/status has invite_token), code#invite-token,
//             button#invite-copy, code#join-command ("mesh-llm --join TOKEN"), button#join-copy
// document.body.dataset.ready = "1" once the first status has rendered.

import { renderMarkdown } from "./markdown.js";

const SPLIT_CAP_MS = 80;
const FADE_S = 60;
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

// The answer's length cap (the chat bar's "Max tokens", 1 to 32768; 512 when empty or invalid).
const maxTokens = () => {
  const n = Number.parseInt($("chat-max-tokens")?.value ?? "", 10);
  return Number.isFinite(n) && n >= 1 ? Math.min(n, 32768) : 512;
};

let status = null; // the latest snapshot
let view = null; // its mesh view, normalised

// ---------------------------------------------------------------- helpers

function h(tag, attrs = {}, ...children) {
  const n = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k === "class") n.className = v;
    else if (k === "text") n.textContent = v;
    else if (k.startsWith("data-")) n.setAttribute(k, String(v));
    else n[k] = v;
  }
  for (const c of children) if (c != null) n.append(c);
  return n;
}

function s(tag, attrs = {}, text) {
  const n = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) if (v != null) n.setAttribute(k, String(v));
  if (text != null) n.textContent = text;
  return n;
}

export function gb(bytes) {
  if (bytes == null || !isFinite(bytes)) return "?";
  const g = bytes / 1e9;
  return (g < 10 ? g.toFixed(2) : g.toFixed(1)) + " GB";
}

function hue(name) {
  let x = 2166136261;
  for (const ch of String(name)) x = Math.imul(x ^ ch.charCodeAt(0), 16777619) >>> 0;
  return x % 360;
}
const colour = (name) => `hsl(${hue(name)} 65% 45%)`;

function rttClass(ms) {
  if (ms == null || !isFinite(ms)) return "unknown";
  return ms < 40 ? "ok" : ms < SPLIT_CAP_MS ? "warn" : "over";
}

function short(id) {
  return String(id ?? "").slice(0, 8);
}

function nameOf(id) {
  const m = view && view.members.find((x) => x.node_id === id);
  return m ? m.name || short(id) : short(id);
}

function fadeOpacity(member) {
  if (member.state === "alive" || !member.state) return 1;
  const age = Date.now() / 1000 - (member.since || Date.now() / 1000);
  return Math.max(0.12, 1 - Math.max(0, age) / FADE_S);
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const t = h("textarea", { value: text });
    document.body.append(t);
    t.select();
    document.execCommand("copy");
    t.remove();
  }
  if (button) {
    const was = button.textContent;
    button.textContent = "Copied";
    setTimeout(() => (button.textContent = was), 1200);
  }
}

// ---------------------------------------------------------------- the mesh view (with a fallback for older status)

/** `status.mesh` when the node sends it, else the same shape derived from `peers` and `models`. */
export function meshView(st) {
  const mesh = st.mesh && typeof st.mesh === "object" ? st.mesh : {};
  let members = Array.isArray(mesh.members) ? mesh.members.slice() : null;
  if (!members) {
    members = (st.peers || []).map((p) => ({
      node_id: p.node_id,
      name: p.name,
      role: p.role,
      self: Boolean(p.self),
      state: "alive",
      addresses: p.addresses || [],
      rtt_ms: p.rtt_gossiped || {},
      rtt_here: p.rtt_ms,
      capacity_bytes: null,
      models: (p.models || []).map((name) => ({
        name,
        state: (p.serving || []).includes(name) ? "serving" : "loading",
      })),
    }));
  }
  if (!members.some((m) => m.self || m.node_id === st.node_id)) {
    members.push({ node_id: st.node_id, name: st.name, role: "host", self: true, state: "alive", rtt_ms: {}, models: [] });
  }
  for (const m of members) {
    if (m.node_id === st.node_id) {
      m.self = true;
      if (!m.models || !m.models.length) {
        m.models = (st.models || []).filter((x) => x.state !== "stopped").map((x) => ({
          name: x.name, state: x.state, in_flight: x.in_flight, slots: x.slots, ctx: x.context, size_bytes: x.size_bytes,
        }));
      }
    }
    m.models = m.models || [];
    m.rtt_ms = m.rtt_ms || {};
  }
  members.sort((a, b) => String(a.node_id).localeCompare(String(b.node_id)));

  let links = Array.isArray(mesh.links) ? mesh.links : null;
  if (!links) {
    const seen = new Map();
    const add = (a, b, ms) => {
      if (a === b || ms == null) return;
      const key = a < b ? `${a}|${b}` : `${b}|${a}`;
      const [x, y] = key.split("|");
      const old = seen.get(key);
      if (!old || ms > old.rtt_ms) seen.set(key, { a: x, b: y, rtt_ms: ms, over_cap: ms >= SPLIT_CAP_MS });
    };
    for (const m of members) {
      for (const [peer, ms] of Object.entries(m.rtt_ms)) add(m.node_id, peer, ms);
      if (m.rtt_here != null) add(st.node_id, m.node_id, m.rtt_here);
    }
    links = [...seen.values()];
  }
  const ids = new Set(members.map((m) => m.node_id));
  links = links.filter((l) => ids.has(l.a) && ids.has(l.b));

  let models = Array.isArray(mesh.models) ? mesh.models : null;
  if (!models) {
    const byName = new Map();
    for (const m of members) {
      if (m.state && m.state !== "alive") continue;
      for (const x of m.models) {
        const e = byName.get(x.name) || { name: x.name, servers: [], loading: [], ctx: x.ctx, stages: [], shards: [] };
        (x.state === "serving" ? e.servers : e.loading).push(m.node_id);
        byName.set(x.name, e);
      }
    }
    const demand = new Map((st.demand || []).map((d) => [d.model, d.rate_per_min]));
    models = [...byName.values()].map((e) => ({
      ...e,
      mode: e.servers.length > 1 ? "replicas" : e.servers.length ? "solo" : "none",
      demand_rate_per_min: demand.get(e.name),
    }));
  }
  return { members, links, models };
}

// ---------------------------------------------------------------- header and join

function renderHeader(st) {
  $("node-name").textContent = `${st.name || ""} · ${st.node_id || ""}`;
  const hw = st.hardware || {};
  const lc = st.llama_cpp || {};
  const gpus = (hw.gpus || []).map((g) => `${g.name} ${gb(g.memory_bytes)}`).join(", ") || "no GPU";
  const parts = [
    st.version ? `v${st.version}` : null,
    `llama.cpp ${lc.version || lc.state || "…"}${lc.backend ? ` (${lc.backend})` : ""}`,
    `${hw.cpu_cores || "?"} cores, ${gb(hw.ram_bytes)} RAM, ${gpus}`,
    st.api_url ? `API ${st.api_url}` : null,
    st.mesh_id ? `mesh ${short(st.mesh_id)}` : null,
  ];
  const info = $("info");
  info.replaceChildren(parts.filter(Boolean).join(" · "));
  if (lc.state === "fallback" || lc.state === "failed") {
    info.append(h("div", { class: "error", text: `llama.cpp ${lc.state}: ${lc.fallback || lc.detail || ""}` }));
  }
}

function renderJoin(token) {
  const show = typeof token === "string" && token.length > 0;
  $("join").hidden = !show;
  $("join-link").hidden = !show;
  $("invite-token").textContent = show ? token : "";
  $("join-command").textContent = show ? `mesh-llm --join ${token}` : "";
}

// ---------------------------------------------------------------- topology

const W = 760;
const H = 520;

/** Deterministic positions: members sorted by node id on a circle (two rings past 12). */
export function layout(members) {
  const pos = new Map();
  const n = members.length;
  if (n === 1) {
    pos.set(members[0].node_id, [W / 2, H / 2]);
    return pos;
  }
  const rings = n > 12 ? [members.slice(0, Math.ceil(n / 2)), members.slice(Math.ceil(n / 2))] : [members];
  rings.forEach((ring, r) => {
    const rx = (W / 2 - 80) * (r === 0 ? 1 : 0.55);
    const ry = (H / 2 - 70) * (r === 0 ? 1 : 0.55);
    ring.forEach((m, i) => {
      const a = -Math.PI / 2 + (2 * Math.PI * i) / ring.length + (r ? Math.PI / ring.length : 0);
      pos.set(m.node_id, [W / 2 + rx * Math.cos(a), H / 2 + ry * Math.sin(a)]);
    });
  });
  return pos;
}

function hull(points) {
  const p = points.slice().sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  if (p.length < 3) return p;
  const cross = (o, a, b) => (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]);
  const lower = [];
  for (const q of p) {
    while (lower.length >= 2 && cross(lower[lower.length - 2], lower[lower.length - 1], q) <= 0) lower.pop();
    lower.push(q);
  }
  const upper = [];
  for (const q of p.slice().reverse()) {
    while (upper.length >= 2 && cross(upper[upper.length - 2], upper[upper.length - 1], q) <= 0) upper.pop();
    upper.push(q);
  }
  return lower.slice(0, -1).concat(upper.slice(0, -1));
}

function groupsOf(models) {
  const out = [];
  for (const m of models) {
    let ids = [];
    if (m.mode === "split") ids = (m.stages || []).map((x) => x.node_id);
    else if (m.mode === "shards") ids = (m.shards || []).map((x) => x.node_id);
    if ((m.mode === "split" || m.mode === "shards") && ids.length < 2) ids = [...(m.servers || []), ...(m.loading || [])];
    ids = [...new Set(ids)];
    if (ids.length >= 2) out.push({ model: m.name, mode: m.mode, ids });
  }
  return out;
}

function renderTopology() {
  const svg = $("topology-svg");
  const { members, links, models } = view;
  const pos = layout(members);
  svg.replaceChildren();

  const groups = s("g", { class: "groups" });
  const legend = [];
  for (const g of groupsOf(models)) {
    const pts = g.ids.map((id) => pos.get(id)).filter(Boolean);
    if (pts.length < 2) continue;
    const poly = hull(pts);
    const d = poly.map((p, i) => `${i ? "L" : "M"}${p[0].toFixed(1)},${p[1].toFixed(1)}`).join(" ") + " Z";
    const c = colour(g.model);
    const path = s("path", { class: "hull", d, fill: c, stroke: c, "data-model": g.model, "data-mode": g.mode });
    path.append(s("title", {}, `${g.model}: ${g.mode} over ${g.ids.map(nameOf).join(", ")}`));
    groups.append(path);
    const sw = h("span", { class: "swatch" });
    sw.style.background = c;
    const what = g.mode === "split" ? "split over" : "sharded over";
    legend.push(h("li", { class: "group", "data-model": g.model, "data-mode": g.mode }, sw, `${g.model}: ${what} ${g.ids.map(nameOf).join(", ")}`));
  }
  svg.append(groups);
  $("topology-groups").replaceChildren(...legend);

  const lines = s("g", { class: "links" });
  for (const l of links) {
    const a = pos.get(l.a);
    const b = pos.get(l.b);
    if (!a || !b) continue;
    const ms = l.rtt_ms;
    const cls = l.over_cap ? "over" : rttClass(ms);
    const line = s("line", {
      class: `link ${cls}`, x1: a[0], y1: a[1], x2: b[0], y2: b[1], "data-a": l.a, "data-b": l.b, "data-rtt": ms ?? "",
    });
    const label = ms == null ? "RTT unknown" : `${Number(ms).toFixed(1)} ms`;
    line.append(s("title", {}, `${nameOf(l.a)} ↔ ${nameOf(l.b)}: ${label}${cls === "over" ? " (over the 80 ms split cap)" : ""}`));
    lines.append(line);
    if (ms != null) {
      lines.append(s("text", { class: "link-label", x: (a[0] + b[0]) / 2, y: (a[1] + b[1]) / 2 - 4 }, `${Math.round(ms)} ms`));
    }
  }
  svg.append(lines);

  const nodes = s("g", { class: "nodes" });
  for (const m of members) {
    const [x, y] = pos.get(m.node_id);
    const state = m.state || "alive";
    const role = m.role || "?";
    const cls = ["node", role, m.self ? "self" : null, state !== "alive" ? state : null].filter(Boolean).join(" ");
    const g = s("g", {
      class: cls, transform: `translate(${x.toFixed(1)},${y.toFixed(1)})`,
      "data-node-id": m.node_id, "data-name": m.name || "", "data-role": role, "data-state": state,
    });
    g.style.opacity = String(fadeOpacity(m));
    const serving = (m.models || []).map((x) => `${x.name} (${x.state || "?"})`).join(", ") || "no models";
    g.append(s("title", {}, `${m.name || ""} ${m.node_id}\n${role}${m.self ? ", this node" : ""}, ${state}\n${serving}`));
    g.append(s("circle", { r: role === "client" ? 16 : 22 }));
    const badgeW = Math.max(34, role.length * 7 + 10);
    g.append(s("rect", { class: "badge", x: -badgeW / 2, y: -8, width: badgeW, height: 16, rx: 8 }));
    g.append(s("text", { class: "badge", y: 4 }, role));
    const label = (m.name || short(m.node_id)).slice(0, 18) + (m.self ? " (this node)" : "");
    g.append(s("text", { class: "name", y: 38 }, label));
    g.append(s("text", { class: "id", y: 51 }, short(m.node_id) + (state !== "alive" ? ` · ${state}` : "")));
    nodes.append(g);
  }
  svg.append(nodes);
  const alive = members.filter((m) => !m.state || m.state === "alive").length;
  $("topology-summary").textContent = `${alive} member${alive === 1 ? "" : "s"} alive · ${links.length} link${links.length === 1 ? "" : "s"}`;
}

function refade() {
  if (!view) return;
  for (const m of view.members) {
    if (!m.state || m.state === "alive") continue;
    const o = String(fadeOpacity(m));
    for (const n of document.querySelectorAll(`[data-node-id="${CSS.escape(m.node_id)}"].node, .bar[data-node-id="${CSS.escape(m.node_id)}"]`)) {
      n.style.opacity = o;
    }
  }
}

// ---------------------------------------------------------------- capacity

function renderCapacity() {
  const box = $("capacity-bars");
  const bars = view.members.map((m) => {
    const cap = m.capacity_bytes;
    const used = (m.models || []).reduce((a, x) => a + (x.size_bytes || 0), 0);
    const client = m.role === "client";  // a client lends nothing, whatever its machine has
    const total = cap && cap > 0 && !client ? cap : null;
    const state = m.state || "alive";
    const bar = h("div", {
      class: `bar ${state !== "alive" ? state : ""}`.trim(), "data-node-id": m.node_id, "data-capacity": cap ?? "",
    });
    bar.style.opacity = String(fadeOpacity(m));
    const summary = total ? `${gb(used)} of ${gb(total)} used` : used ? `${gb(used)} used, capacity unknown`
      : cap === 0 || client ? "offers no memory" : "capacity unknown";
    bar.append(h("div", { class: "label" },
      h("span", { text: `${m.name || short(m.node_id)} · ${m.role || "?"}${m.self ? " (this node)" : ""}` }),
      h("span", { class: "muted", text: summary })));
    const track = h("div", { class: "track" });
    const scale = total || used || 1;
    for (const x of m.models || []) {
      const bytes = x.size_bytes || 0;
      if (!bytes) continue;
      const what = x.stage ? `${x.name} layers ${x.stage[0]}–${x.stage[1]}` : x.name;
      const seg = h("div", { class: "seg", "data-model": x.name, "data-bytes": bytes, title: `${what}: ${gb(bytes)} (${x.state || "?"})`, text: `${what} ${gb(bytes)}` });
      if (x.stage) seg.dataset.stage = `${x.stage[0]}-${x.stage[1]}`;
      seg.style.width = `${Math.min(100, (100 * bytes) / scale)}%`;
      seg.style.background = colour(x.name);
      track.append(seg);
    }
    if (total) {
      const free = Math.max(0, total - used);
      track.append(h("div", { class: "seg free", "data-bytes": free, title: `free: ${gb(free)}`, text: `${gb(free)} free` }));
    }
    bar.append(track);
    return bar;
  });
  box.replaceChildren(...(bars.length ? bars : [h("p", { class: "muted", text: "No members yet." })]));
}

// ---------------------------------------------------------------- models

function whereCell(m, local) {
  const td = h("td", { class: "where" });
  td.append(h("span", { class: "mode", text: m.mode || "none" }));
  const servers = m.servers || [];
  if (m.mode === "split" && (m.stages || []).length) {
    const ul = h("ul");
    for (const st of m.stages) {
      const [a, b] = st.layers || [];
      ul.append(h("li", { class: "stage", "data-node-id": st.node_id, text: `${nameOf(st.node_id)}: layers ${a}–${b}` }));
    }
    td.append(ul);
  } else if (m.mode === "shards" && (m.shards || []).length) {
    const ul = h("ul");
    for (const sh of m.shards) {
      const q = sh.quality && typeof sh.quality.agreement === "number" ? `, top-1 agreement ${sh.quality.agreement.toFixed(3)}` : "";
      const gate = sh.passed === true ? ", passed the gate" : sh.passed === false ? ", below the gate" : "";
      ul.append(h("li", { class: `shard${sh.passed === false ? " error" : ""}`, "data-node-id": sh.node_id, "data-experts": sh.experts, text: `${nameOf(sh.node_id)}: ${sh.experts} experts${q}${gate}` }));
    }
    td.append(ul);
  } else if (servers.length) {
    td.append(servers.map(nameOf).join(", "));
  }
  if ((m.loading || []).length) td.append(h("div", { class: "muted", text: `loading on ${m.loading.map(nameOf).join(", ")}` }));
  if ((m.failed || []).length) td.append(h("div", { class: "error failed-on", text: `failed on ${m.failed.map(nameOf).join(", ")}` }));
  const reasons = local && local.placement && Array.isArray(local.placement.reasons) ? local.placement.reasons : [];
  if (reasons.length) td.append(h("div", { class: "muted detail", text: reasons.join("\n") }));
  if (local && local.detail) td.append(h("div", { class: `detail ${local.state === "failed" ? "error" : "muted"}`, text: local.detail }));
  return td;
}

function renderModels() {
  const locals = new Map((status.models || []).map((m) => [m.name, m]));
  const rows = [];
  const names = new Set();
  const entries = view.models.map((m) => ({ m, local: locals.get(m.name) }));
  for (const [name, local] of locals) {
    if (!view.models.some((m) => m.name === name)) {
      entries.push({ m: { name, servers: [], loading: [], mode: "none", ctx: local.context, tools: local.tools, reasoning: local.thinking }, local });
    }
  }
  for (const { m, local } of entries) {
    if (names.has(m.name)) continue;
    names.add(m.name);
    let state = (m.servers || []).length ? "serving" : (m.loading || []).length ? "loading" : "none";
    if (local && (state === "none" || local.state === "failed" || local.state === "downloading")) state = local.state;
    const pct = local && local.state === "downloading" && local.progress != null ? ` ${Math.round(local.progress * 100)}%` : "";
    const predicted = m.predicted_tok_s ?? (local && local.placement ? local.placement.predicted_tok_s : null);
    const measured = m.measured_tok_s ?? (local ? local.measured_tok_s : null);
    const toks = [predicted != null ? `${Number(predicted).toFixed(1)} predicted` : null,
      measured != null ? `${Number(measured).toFixed(1)} measured` : null].filter(Boolean).join(", ");
    const ctx = m.ctx ?? (local ? local.context : null);
    const tools = m.tools ?? (local ? local.tools : null);
    const thinks = m.reasoning ?? (local ? local.thinking : null);
    // This node's own counts (status.requests): errors are only known on the node a request entered.
    const here = (status.requests || {})[m.name] || {};
    const errors = (here.client_error || 0) + (here.upstream_error || 0);
    const live = here.ok != null || here.in_flight ? `${here.in_flight || 0} in flight · ${here.ok || 0} ok · ${errors} error${errors === 1 ? "" : "s"}` : "";
    const tr = h("tr", { class: state === "failed" ? "failed" : "", "data-model": m.name, "data-state": state, "data-mode": m.mode || "none" });
    const nameCell = h("td", {}, h("span", { class: "swatch" }), m.name);
    nameCell.firstChild.style.background = colour(m.name);
    tr.append(
      nameCell,
      h("td", { class: `state state-${state}`, text: state + pct }),
      whereCell(m, local),
      h("td", { class: "ctx", text: ctx != null ? String(ctx) : "" }),
      h("td", { class: "tools", text: tools == null ? "?" : tools ? "yes" : "no" }),
      h("td", { class: "thinks", text: thinks == null ? "?" : thinks ? "yes" : "no", title: "a thinking model: thinking is off unless a request asks" }),
      h("td", { class: "toks", text: toks }),
      h("td", { class: "demand", text: m.demand_rate_per_min != null ? `${Number(m.demand_rate_per_min).toFixed(1)} req/min` : "" }),
      h("td", { class: errors ? "live error" : "live", text: live, title: "requests that entered this node",
        "data-in-flight": here.in_flight || 0, "data-ok": here.ok || 0, "data-errors": errors }),
    );
    rows.push(tr);
  }
  $("models-body").replaceChildren(...(rows.length ? rows
    : [h("tr", { class: "empty" }, h("td", { colSpan: 9, class: "muted", text: "No models. Start one with mesh-llm --model SmolLM2-135M-Instruct." }))]));
}

// ---------------------------------------------------------------- chat

const chat = { messages: [], controller: null };

function servingModels() {
  const names = view.models.filter((m) => (m.servers || []).length).map((m) => m.name);
  for (const m of status.models || []) if (m.state === "serving" && !names.includes(m.name)) names.push(m.name);
  return names.sort();
}

function renderPicker() {
  const sel = $("chat-model");
  const names = servingModels();
  const current = sel.value;
  const have = [...sel.options].map((o) => o.value).filter(Boolean);
  if (have.join("\n") === names.join("\n")) return;
  sel.replaceChildren(...(names.length ? names.map((n) => h("option", { value: n, text: n })) : [h("option", { value: "", text: "no model serving" })]));
  if (names.includes(current)) sel.value = current;
  updateChatButtons();
}

function updateChatButtons() {
  const busy = chat.controller != null;
  $("chat-send").disabled = busy || !$("chat-model").value;
  $("chat-stop").disabled = !busy;
  $("chat-regen").disabled = busy || !chat.messages.some((m) => m.role === "user") || !$("chat-model").value;
}

function addMessage(role, text) {
  const body = h("div", { class: "body" });
  const who = h("div", { class: "who" }, h("span", { text: role === "user" ? "you" : $("chat-model").value }));
  const msg = h("div", { class: `msg ${role}` }, who, body);
  if (role === "user") body.textContent = text;
  else {
    msg.dataset.state = "streaming";
    const copy = h("button", { class: "copy", type: "button", text: "Copy" });
    copy.addEventListener("click", () => copyText(msg.dataset.raw || "", copy));
    who.append(copy);
  }
  $("chat-log").append(msg);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return msg;
}

function errorSentence(text, status_) {
  try {
    const j = JSON.parse(text);
    const e = j.error;
    if (e && typeof e === "object" && e.message) return e.message;
    if (typeof e === "string") return e;
    if (j.detail) return String(j.detail);
  } catch { /* not JSON */ }
  return text.trim() || `HTTP ${status_}`;
}

async function runChat() {
  const model = $("chat-model").value;
  if (!model) return;
  const msg = addMessage("assistant", "");
  const body = msg.querySelector(".body");
  let answer = "";
  let pending = false;
  const paint = () => {
    pending = false;
    msg.dataset.raw = answer;
    body.replaceChildren(renderMarkdown(answer));
    $("chat-log").scrollTop = $("chat-log").scrollHeight;
  };
  chat.controller = new AbortController();
  updateChatButtons();
  try {
    const res = await fetch("/api/chat", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify({ model, messages: chat.messages, stream: true, max_tokens: maxTokens() }),
      signal: chat.controller.signal,
    });
    if (!res.ok) throw new Error(errorSentence(await res.text(), res.status));
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    let done = false;
    while (!done) {
      const chunk = await reader.read();
      if (chunk.done) break;
      buf += decoder.decode(chunk.value, { stream: true });
      const lines = buf.split(/\r?\n/);
      buf = lines.pop();
      for (const line of lines) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") { done = true; break; }
        let j;
        try { j = JSON.parse(data); } catch { continue; }
        if (j.error) throw new Error(typeof j.error === "string" ? j.error : j.error.message || "the model failed");
        const delta = j.choices && j.choices[0] && (j.choices[0].delta || j.choices[0].message);
        if (delta && typeof delta.content === "string" && delta.content) {
          answer += delta.content;
          if (!pending) { pending = true; requestAnimationFrame(paint); }
        }
      }
    }
    paint();
    msg.dataset.state = "done";
    chat.messages.push({ role: "assistant", content: answer });
  } catch (err) {
    paint();
    if (err.name === "AbortError") {
      msg.dataset.state = "stopped";
      if (answer) chat.messages.push({ role: "assistant", content: answer });
    } else {
      msg.dataset.state = "error";
      msg.classList.add("error");
      body.append(h("p", { class: "error", text: String(err.message || err) }));
    }
  } finally {
    chat.controller = null;
    updateChatButtons();
  }
}

function send() {
  const text = $("chat-input").value.trim();
  if (!text || chat.controller || !$("chat-model").value) return;
  $("chat-input").value = "";
  chat.messages.push({ role: "user", content: text });
  addMessage("user", text);
  runChat();
}

function regenerate() {
  if (chat.controller) return;
  while (chat.messages.length && chat.messages[chat.messages.length - 1].role === "assistant") chat.messages.pop();
  const log = $("chat-log");
  const last = log.lastElementChild;
  if (last && last.classList.contains("assistant")) last.remove();
  if (chat.messages.length) runChat();
}

function setupChat() {
  $("chat-form").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("chat-stop").addEventListener("click", () => chat.controller && chat.controller.abort());
  $("chat-regen").addEventListener("click", regenerate);
  $("chat-model").addEventListener("change", updateChatButtons);
  $("chat-clear").addEventListener("click", () => {
    if (chat.controller) chat.controller.abort();
    chat.messages = [];
    $("chat-log").replaceChildren();
    updateChatButtons();
  });
}

// ---------------------------------------------------------------- blackboard

let boardQuery = "";
let boardBusy = false;

async function loadBoard() {
  if (boardBusy) return;
  boardBusy = true;
  try {
    const url = "/api/blackboard?limit=50" + (boardQuery ? `&q=${encodeURIComponent(boardQuery)}` : "");
    const res = await fetch(url, { headers: { Accept: "application/json" } });
    const text = await res.text();
    if (!res.ok) {
      $("board-status").textContent = errorSentence(text, res.status);
      $("board-form").hidden = res.status === 404;
      $("board-feed").replaceChildren();
      return;
    }
    $("board-form").hidden = false;
    const posts = (JSON.parse(text).posts || []);
    $("board-status").textContent = posts.length ? "" : boardQuery ? "No posts match." : "No posts yet.";
    $("board-feed").replaceChildren(...posts.map((p) => h("div", { class: "post", "data-post-id": p.id },
      h("div", { class: "meta", text: [p.author, p.kind, p.created ? new Date(p.created * 1000).toLocaleString() : null].filter(Boolean).join(" · ") }),
      h("div", { class: "text", text: p.text }))));
  } catch (err) {
    $("board-status").textContent = `could not read the blackboard: ${err.message || err}`;
  } finally {
    boardBusy = false;
  }
}

function setupBoard() {
  $("board-search").addEventListener("submit", (e) => {
    e.preventDefault();
    boardQuery = $("board-q").value.trim();
    loadBoard();
  });
  $("board-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = $("board-text").value;
    if (!text.trim()) return;
    const err = $("board-error");
    err.hidden = true;
    $("board-post").disabled = true;
    try {
      const res = await fetch("/api/blackboard", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ text }),
      });
      if (!res.ok) {
        err.textContent = errorSentence(await res.text(), res.status);
        err.hidden = false;
        return;
      }
      $("board-text").value = "";
      await loadBoard();
    } catch (ex) {
      err.textContent = `could not post: ${ex.message || ex}`;
      err.hidden = false;
    } finally {
      $("board-post").disabled = false;
    }
  });
  $("board-text").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("board-form").requestSubmit();
  });
  loadBoard();
  setInterval(() => { if (!document.hidden) loadBoard(); }, 5000);
}

// ---------------------------------------------------------------- wiring

function render(st) {
  status = st;
  try {
    view = meshView(st);
  } catch (err) {
    console.warn("mesh view:", err);
    view = { members: [], links: [], models: [] };
  }
  for (const [name, fn] of [["header", () => renderHeader(st)], ["topology", renderTopology], ["capacity", renderCapacity],
    ["models", renderModels], ["chat", renderPicker]]) {
    try { fn(); } catch (err) { console.warn(`render ${name}:`, err); }
  }
  document.body.dataset.ready = "1";
}

function setConn(state, text) {
  $("conn").dataset.state = state;
  $("conn").textContent = text;
}

let es = null;
let retryMs = 1000;

function connect() {
  if (es) es.close();
  es = new EventSource("/api/events");
  es.addEventListener("open", () => { retryMs = 1000; });
  es.addEventListener("status", (e) => {
    setConn("live", "live");
    try { render(JSON.parse(e.data)); } catch (err) { console.warn("status event:", err); }
  });
  es.onerror = () => {
    setConn("reconnecting", "reconnecting…");
    es.close();
    es = null;
    setTimeout(connect, retryMs);
    retryMs = Math.min(retryMs * 2, 10000);
  };
}

async function start() {
  $("invite-copy").addEventListener("click", (e) => copyText($("invite-token").textContent, e.currentTarget));
  $("join-copy").addEventListener("click", (e) => copyText($("join-command").textContent, e.currentTarget));
  setupChat();
  setupBoard();
  try {
    // The invite token comes only in /api/status fetched on this machine, never in the event stream.
    const res = await fetch("/api/status", { headers: { Accept: "application/json" } });
    const st = await res.json();
    renderJoin(st.invite_token);
    if (!status) render(st);
  } catch (err) {
    setConn("reconnecting", "no status");
  }
  connect();
  setInterval(refade, 1000);
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
else start();
