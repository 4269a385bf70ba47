// saelab inspect: a static latent browser. Data comes from data/*.js scripts that set window.SAELAB_* globals
// (file:// pages cannot fetch()). All view state lives in the URL hash: #q=TEXT&sort=KEY&asc=1&page=N&latent=ID.
(function () {
  "use strict";
  const INDEX = window.SAELAB_INDEX;
  const VOCAB = window.SAELAB_VOCAB || {};
  const META = INDEX.meta;
  const N = META.d_sae;
  const PAGE_SIZE = 500;
  const SORT_KEYS = ["id", "density", "max", "mean", "maxcos"];
  const state = { q: "", sort: "id", asc: true, page: 0, latent: null };
  let shownLatent = null;

  const $ = (id) => document.getElementById(id);
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  const tokenText = (id) => (id in VOCAB ? VOCAB[id] : "<" + id + ">");
  const visible = (text) => text.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
  const missing = (x) => x === null || x === undefined || Number.isNaN(x);
  const fmt = (x) => (missing(x) ? "\u2013" : Math.abs(x) !== 0 && Math.abs(x) < 1e-3 ? x.toExponential(2) : Number(x.toPrecision(3)).toString());
  const column = (key, i) => (key === "id" ? i : INDEX[key][i]);
  const searchText = INDEX.tokens.map((ids) => ids.map(tokenText).join("\u0000").toLowerCase());

  // ------------------------------------------------------------------ URL hash <-> state
  function readHash() {
    const p = new URLSearchParams(location.hash.slice(1));
    state.q = p.get("q") || "";
    state.sort = SORT_KEYS.includes(p.get("sort")) ? p.get("sort") : "id";
    state.asc = p.has("asc") ? p.get("asc") === "1" : state.sort === "id";
    state.page = Math.max(0, parseInt(p.get("page") || "0", 10) || 0);
    const latent = parseInt(p.get("latent"), 10);
    state.latent = Number.isInteger(latent) && latent >= 0 && latent < N ? latent : null;
  }

  function setHash(changes) {
    const next = Object.assign({}, state, changes);
    const p = new URLSearchParams();
    if (next.q) p.set("q", next.q);
    if (next.sort !== "id") p.set("sort", next.sort);
    if (next.asc !== (next.sort === "id")) p.set("asc", next.asc ? "1" : "0");
    if (next.page) p.set("page", String(next.page));
    if (next.latent !== null) p.set("latent", String(next.latent));
    location.hash = p.toString();
  }

  // ------------------------------------------------------------------ index
  function matches(i, q) {
    if (!q) return true;
    const id = q.match(/^#?(\d+)$/);
    if (id) return i === parseInt(id[1], 10);
    return searchText[i].includes(q.toLowerCase());
  }

  function sortedRows() {
    const rows = [];
    for (let i = 0; i < N; i++) if (matches(i, state.q.trim())) rows.push(i);
    const key = state.sort, sign = state.asc ? 1 : -1;
    rows.sort((a, b) => {
      const x = column(key, a), y = column(key, b);
      if (missing(x) || missing(y)) return missing(x) - missing(y) || a - b;
      return (x - y) * sign || a - b;
    });
    return rows;
  }

  function renderIndex() {
    const rows = sortedRows();
    const pages = Math.max(1, Math.ceil(rows.length / PAGE_SIZE));
    const page = Math.min(state.page, pages - 1);
    const html = [];
    for (const i of rows.slice(page * PAGE_SIZE, (page + 1) * PAGE_SIZE)) {
      const dead = INDEX.fires[i] === 0;
      const tags = INDEX.tokens[i].slice(0, 6).map((t) => '<span class="toktag">' + esc(visible(tokenText(t))) + "</span>").join("");
      html.push(
        '<tr data-latent="' + i + '" class="' + (dead ? "dead" : "") + (i === state.latent ? " open" : "") + '">' +
          "<td>#" + i + "</td><td>" + (dead ? '<span class="badge dead">dead</span>' : fmt(INDEX.density[i])) + "</td>" +
          "<td>" + fmt(INDEX.max[i]) + "</td><td>" + fmt(INDEX.mean[i]) + "</td><td>" + fmt(INDEX.maxcos[i]) + "</td>" +
          "<td>" + tags + "</td></tr>"
      );
    }
    document.querySelector("#index tbody").innerHTML = html.join("");
    $("count").textContent = rows.length + " of " + N + " latents";
    $("page").textContent = " page " + (page + 1) + " / " + pages + " ";
    $("prev").disabled = page === 0;
    $("next").disabled = page >= pages - 1;
    for (const th of document.querySelectorAll("#index th[data-key]")) {
      th.classList.toggle("sorted", th.dataset.key === state.sort);
      th.classList.toggle("asc", th.dataset.key === state.sort && state.asc);
    }
    if ($("search").value !== state.q) $("search").value = state.q;
  }

  // ------------------------------------------------------------------ data files
  const loaded = {};
  function loadScript(src) {
    if (!loaded[src]) {
      loaded[src] = new Promise((resolve, reject) => {
        const s = document.createElement("script");
        s.src = src;
        s.onload = resolve;
        s.onerror = () => reject(new Error("cannot load " + src));
        document.head.appendChild(s);
      });
    }
    return loaded[src];
  }

  async function latentRecord(i) {
    const file = Math.floor(i / META.latents_per_file);
    await loadScript("data/latents_" + file + ".js");
    const rec = window.SAELAB_LATENTS[file][i - file * META.latents_per_file];
    const files = new Set(rec.top.concat(rec.samples).map((e) => Math.floor(e[1] / META.contexts_per_file)));
    await Promise.all([...files].map((k) => loadScript("data/contexts_" + k + ".js")));
    return rec;
  }

  function contextTokens(ctx) {
    const k = Math.floor(ctx / META.contexts_per_file);
    return window.SAELAB_CONTEXTS[k][ctx - k * META.contexts_per_file];
  }

  // ------------------------------------------------------------------ latent panel
  function exampleHtml(e, scale) {
    const [value, ctx, pos, start, acts] = e;
    const tokens = contextTokens(ctx);
    const spans = acts.map((a, j) => {
      const text = tokenText(tokens[start + j]);
      const alpha = missing(a) || scale <= 0 ? 0 : Math.max(0, Math.min(1, a / scale));
      const hit = start + j === pos ? " hit" : "";
      return '<span class="tok' + hit + '" style="background:rgba(255,152,0,' + alpha.toFixed(3) + ')" title="' +
        esc(JSON.stringify(text) + "  act " + fmt(a)) + '">' + esc(visible(text)) + "</span>";
    });
    return '<div class="example" data-value="' + value + '" data-context="' + ctx + '" data-pos="' + pos + '">' +
      '<span class="val">' + fmt(value) + "</span>" + spans.join("") + "</div>";
  }

  function histogramSvg(hist) {
    if (!hist.length) return '<p class="note">never fired</p>';
    const edges = META.hist_edges, first = hist[0][0], last = hist[hist.length - 1][0];
    const counts = new Map(hist), nb = last - first + 1, peak = Math.max(...hist.map((h) => h[1]));
    const W = 320, H = 110, bw = W / nb;
    const bars = [];
    for (let b = first; b <= last; b++) {
      const c = counts.get(b) || 0, h = (c / peak) * (H - 22);
      bars.push('<rect x="' + ((b - first) * bw + 1).toFixed(1) + '" y="' + (H - 14 - h).toFixed(1) + '" width="' +
        Math.max(bw - 2, 1).toFixed(1) + '" height="' + h.toFixed(1) + '"><title>' + fmt(edges[b]) + "\u2013" +
        fmt(edges[b + 1]) + ": " + c + "</title></rect>");
    }
    return '<svg class="hist" width="' + W + '" height="' + H + '">' + bars.join("") +
      '<text x="0" y="' + (H - 2) + '">' + fmt(edges[first]) + '</text><text x="' + (W - 40) + '" y="' + (H - 2) + '">' +
      fmt(edges[last + 1]) + '</text><text x="0" y="9">' + peak + " (log-spaced bins)</text></svg>";
  }

  function latentLink(j, label) {
    return '<a class="latent" data-latent="' + j + '">#' + j + "</a> " + label;
  }

  function quantileGroups(samples, scale) {
    if (!samples.length) return '<p class="note">no firings</p>';
    const s = samples.length, groups = Math.min(4, s), html = [];
    for (let g = 0; g < groups; g++) {
      const lo = Math.floor((g * s) / groups), hi = Math.floor(((g + 1) * s) / groups);
      const part = samples.slice(lo, hi);  // samples are sorted by activation, descending
      const qHi = 100 * (1 - lo / s), qLo = 100 * (1 - hi / s);
      html.push("<h4 class=\"note\">quantiles " + qLo.toFixed(0) + "\u2013" + qHi.toFixed(0) + "% of firings (act " +
        fmt(part[part.length - 1][0]) + "\u2013" + fmt(part[0][0]) + ")</h4>" + part.map((e) => exampleHtml(e, scale)).join(""));
    }
    return html.join("");
  }

  function renderPanel(i, rec) {
    const fires = INDEX.fires[i], scale = INDEX.max[i] || 0;
    const tokenList = (pairs) => pairs.length ? '<ul class="list">' + pairs.map(([t, v]) =>
      '<li><span class="toktag">' + esc(visible(tokenText(t))) + "</span> " + fmt(v) + "</li>").join("") + "</ul>"
      : '<p class="note">not available</p>';
    const atLeast = rec.cofiring_error ? "\u2265" : "";
    const cof = rec.cofiring.map(([j, c]) => latentLink(j, atLeast + c + " (" + fmt((100 * c) / Math.max(fires, 1)) + "%)"));
    const err = rec.cofiring_error ? " Counts are lower bounds, low by at most " + rec.cofiring_error + "." : "";
    $("panel").dataset.latent = String(i);
    $("panel").innerHTML =
      "<h2>Latent #" + i + (fires === 0 ? ' <span class="badge dead">dead</span>' : "") + "</h2>" +
      '<div class="stats"><span>density ' + fmt(INDEX.density[i]) + "</span><span>fires " + fires + "</span><span>max " +
      fmt(INDEX.max[i]) + "</span><span>mean " + fmt(INDEX.mean[i]) + "</span><span>max cos " + fmt(INDEX.maxcos[i]) + "</span></div>" +
      '<div class="cols"><div><h3>Activation histogram</h3>' + histogramSvg(rec.hist) + "</div><div><h3>Promoted tokens</h3>" +
      tokenList(rec.promoted) + "</div><div><h3>Suppressed tokens</h3>" + tokenList(rec.suppressed) + "</div></div>" +
      '<h3>Top activations</h3><div id="top">' + rec.top.map((e) => exampleHtml(e, scale)).join("") + "</div>" +
      '<div class="cols two"><div><h3>Nearest latents (decoder cos)</h3><ul class="list">' +
      rec.nearest.map(([j, c]) => "<li>" + latentLink(j, fmt(c)) + "</li>").join("") +
      '</ul></div><div><h3>Co-firing latents</h3><ul class="list">' + cof.map((l) => "<li>" + l + "</li>").join("") +
      "</ul></div></div>" + '<p class="note">Logits: ' + esc(META.logit_note) + " Co-firing: among each token's " +
      META.cofiring_cap + " strongest latents; % of this latent's firings." + err + "</p>" +
      '<h3>Samples by activation quantile</h3><div id="samples">' + quantileGroups(rec.samples, scale) + "</div>";
  }

  async function showLatent() {
    if (state.latent === shownLatent) return;
    shownLatent = state.latent;
    if (state.latent === null) return;
    const i = state.latent;
    try {
      const rec = await latentRecord(i);
      if (state.latent === i) renderPanel(i, rec);
    } catch (err) {
      $("panel").innerHTML = '<p class="note">' + esc(err.message) + "</p>";
    }
  }

  function render() {
    renderIndex();
    showLatent();
  }

  // ------------------------------------------------------------------ events
  let typing = null;
  $("search").addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => setHash({ q: $("search").value, page: 0 }), 150);
  });
  $("prev").addEventListener("click", () => setHash({ page: Math.max(0, state.page - 1) }));
  $("next").addEventListener("click", () => setHash({ page: state.page + 1 }));
  for (const th of document.querySelectorAll("#index th[data-key]")) {
    th.addEventListener("click", () => {
      const key = th.dataset.key;
      setHash({ sort: key, asc: key === state.sort ? !state.asc : key === "id", page: 0 });
    });
  }
  document.body.addEventListener("click", (ev) => {
    const target = ev.target.closest("[data-latent]");
    if (target && target.id !== "panel") setHash({ latent: parseInt(target.dataset.latent, 10) });
  });
  window.addEventListener("hashchange", () => { readHash(); render(); });
  $("summary").textContent = N + " latents \u00b7 " + META.hook_name + " \u00b7 " + META.n_tokens.toLocaleString() +
    " tokens" + (META.sae ? " \u00b7 " + META.sae : "") + (META.model ? " \u00b7 " + META.model : "");
  readHash();
  render();
})();
