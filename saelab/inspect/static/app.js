// saelab inspect: a latent browser. Data comes from data/*.js scripts that set window.SAELAB_* globals
// (file:// pages cannot fetch()). All view state lives in the URL hash:
// #q=TEXT&sort=KEY&asc=1&page=N&latent=ID&dmin=X&dmax=Y&dead=0. Served by `saelab inspect serve=true`, the page
// also gets a text box that runs the model and the SAE (POST api/run).
(function () {
  "use strict";
  const INDEX = window.SAELAB_INDEX;
  const VOCAB = window.SAELAB_VOCAB || {};
  const EXPL = (window.SAELAB_EXPLANATIONS || {}).latents || {};
  const META = INDEX.meta;
  const N = META.d_sae;
  const PAGE_SIZE = 500;
  const SORT_KEYS = ["id", "density", "max", "mean", "maxcos", "score"];
  const state = { q: "", sort: "id", asc: true, page: 0, latent: null, asked: null, dmin: null, dmax: null, hideDead: false };
  let shownLatent = null;
  let order = [];  // the latents listed by the current search, filters and sort (for keyboard navigation)

  const $ = (id) => document.getElementById(id);
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  const tokenText = (id) => (id in VOCAB ? VOCAB[id] : "<" + id + ">");
  const visible = (text) => text.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
  const missing = (x) => x === null || x === undefined || Number.isNaN(x);
  const fmt = (x) => (missing(x) ? "\u2013" : Math.abs(x) !== 0 && Math.abs(x) < 1e-3 ? x.toExponential(2) : Number(x.toPrecision(3)).toString());
  const score = (i) => (EXPL[i] && !missing(EXPL[i].detection) ? EXPL[i].detection : null);
  const column = (key, i) => (key === "id" ? i : key === "score" ? score(i) : INDEX[key][i]);
  const searchText = INDEX.tokens.map((ids, i) => (ids.map(tokenText).join("\u0000") + "\u0000" + (EXPL[i] ? EXPL[i].text : "")).toLowerCase());
  const numberOrNull = (s) => (s === null || s === "" || Number.isNaN(parseFloat(s)) ? null : parseFloat(s));

  // ------------------------------------------------------------------ URL hash <-> state
  function readHash() {
    const p = new URLSearchParams(location.hash.slice(1));
    state.q = p.get("q") || "";
    state.sort = SORT_KEYS.includes(p.get("sort")) ? p.get("sort") : "id";
    state.asc = p.has("asc") ? p.get("asc") === "1" : state.sort === "id";
    state.page = Math.max(0, parseInt(p.get("page") || "0", 10) || 0);
    state.asked = p.has("latent") ? p.get("latent") : null;
    const latent = /^\d+$/.test(state.asked || "") ? parseInt(state.asked, 10) : NaN;
    state.latent = latent < N ? latent : null;
    state.dmin = numberOrNull(p.get("dmin"));
    state.dmax = numberOrNull(p.get("dmax"));
    state.hideDead = p.get("dead") === "0";
  }

  function setHash(changes) {
    const next = Object.assign({}, state, changes);
    const p = new URLSearchParams();
    if (next.q) p.set("q", next.q);
    if (next.sort !== "id") p.set("sort", next.sort);
    if (next.asc !== (next.sort === "id")) p.set("asc", next.asc ? "1" : "0");
    if (next.page) p.set("page", String(next.page));
    if ("latent" in changes ? next.latent !== null : next.asked !== null) p.set("latent", String("latent" in changes ? next.latent : next.asked));
    if (next.dmin !== null) p.set("dmin", String(next.dmin));
    if (next.dmax !== null) p.set("dmax", String(next.dmax));
    if (next.hideDead) p.set("dead", "0");
    location.hash = p.toString();
  }

  // ------------------------------------------------------------------ index
  function matches(i, q) {
    if (state.hideDead && INDEX.fires[i] === 0) return false;
    if (state.dmin !== null && !(INDEX.density[i] >= state.dmin)) return false;
    if (state.dmax !== null && !(INDEX.density[i] <= state.dmax)) return false;
    if (!q) return true;
    const id = q.match(/^#?(\d+)$/);
    if (id) return i === parseInt(id[1], 10);
    return searchText[i].includes(q.toLowerCase());
  }

  function sortedRows() {
    const rows = [], q = state.q.trim();
    for (let i = 0; i < N; i++) if (matches(i, q)) rows.push(i);
    const key = state.sort, sign = state.asc ? 1 : -1;
    rows.sort((a, b) => {
      const x = column(key, a), y = column(key, b);
      if (missing(x) || missing(y)) return missing(x) - missing(y) || a - b;
      return (x - y) * sign || a - b;
    });
    return rows;
  }

  function explanationCell(i) {
    const tags = INDEX.tokens[i].slice(0, 6).map((t) => '<span class="toktag">' + esc(visible(tokenText(t))) + "</span>").join("");
    if (!EXPL[i]) return tags;
    const e = EXPL[i], s = missing(e.detection) ? "" : " (" + fmt(e.detection) + ")";
    return '<span class="expl" title="' + esc(e.text + s) + '">' + esc(e.text) + s + "</span> " + tags;
  }

  function renderIndex() {
    order = sortedRows();
    const pages = Math.max(1, Math.ceil(order.length / PAGE_SIZE));
    const page = Math.min(state.page, pages - 1);
    const html = [];
    for (const i of order.slice(page * PAGE_SIZE, (page + 1) * PAGE_SIZE)) {
      const dead = INDEX.fires[i] === 0;
      html.push(
        '<tr data-latent="' + i + '" class="' + (dead ? "dead" : "") + (i === state.latent ? " open" : "") + '">' +
          "<td>#" + i + "</td><td>" + (dead ? '<span class="badge dead">dead</span>' : fmt(INDEX.density[i])) + "</td>" +
          "<td>" + fmt(INDEX.max[i]) + '</td><td class="wide">' + fmt(INDEX.mean[i]) + '</td><td class="wide">' + fmt(INDEX.maxcos[i]) + "</td>" +
          "<td>" + explanationCell(i) + "</td></tr>"
      );
    }
    document.querySelector("#index tbody").innerHTML = html.join("");
    $("count").textContent = order.length + " of " + N + " latents";
    $("page").textContent = " page " + (page + 1) + " / " + pages + " ";
    $("prev").disabled = page === 0;
    $("next").disabled = page >= pages - 1;
    const id = state.q.trim().match(/^#?(\d+)$/);
    $("search-note").hidden = !(id && parseInt(id[1], 10) >= N);
    if (id) $("search-note").textContent = "There is no latent " + id[1] + ": this SAE has latents 0\u2013" + (N - 1) + ".";
    for (const th of document.querySelectorAll("#index th[data-key]")) {
      th.classList.toggle("sorted", th.dataset.key === state.sort);
      th.classList.toggle("asc", th.dataset.key === state.sort && state.asc);
    }
    if ($("search").value !== state.q) $("search").value = state.q;
    if (numberOrNull($("dmin").value) !== state.dmin) $("dmin").value = state.dmin === null ? "" : state.dmin;
    if (numberOrNull($("dmax").value) !== state.dmax) $("dmax").value = state.dmax === null ? "" : state.dmax;
    $("hide-dead").checked = state.hideDead;
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

  // ------------------------------------------------------------------ binary fields (saelab/inspect/codec.py)
  function bytesOf(b64) {
    const text = atob(b64), out = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
    return new DataView(out.buffer);
  }
  function half(view, at) {  // little-endian float16
    const h = view.getUint16(at, true), sign = h >> 15 ? -1 : 1, exp = (h >> 10) & 31, frac = h & 1023;
    if (exp === 0) return sign * frac * Math.pow(2, -24);
    if (exp === 31) return frac ? NaN : sign * Infinity;
    return sign * (1 + frac / 1024) * Math.pow(2, exp - 15);
  }
  function unsigned(view, at, bytes) {
    return bytes === 1 ? view.getUint8(at) : bytes === 2 ? view.getUint16(at, true) : view.getUint32(at, true);
  }
  // examples -> [[context, position, value, offset, act, ...], ...]
  function decodeExamples(b64) {
    const view = bytesOf(b64), cb = META.context_bytes, pb = META.position_bytes, rows = [];
    for (let at = 0; at < view.byteLength;) {
      const row = [unsigned(view, at, cb), unsigned(view, at + cb, pb), half(view, at + cb + pb)];
      const n = view.getUint8(at + cb + pb + 2);
      at += cb + pb + 3;
      for (let j = 0; j < n; j++, at += 3) row.push(view.getInt8(at), half(view, at + 1));
      rows.push(row);
    }
    return rows;
  }
  // ranked lists -> [[id, value], ...]; co-firing (withCount) -> [[id, count, jaccard], ...]
  function decodeList(b64, withCount) {
    const view = bytesOf(b64), size = withCount ? 10 : 6, rows = [];
    for (let at = 0; at + size <= view.byteLength; at += size) {
      rows.push(withCount ? [view.getUint32(at, true), view.getUint32(at + 4, true), half(view, at + 8)]
        : [view.getUint32(at, true), half(view, at + 4)]);
    }
    return rows;
  }

  function decodeRecord(raw) {
    return {
      top: decodeExamples(raw.top), scale: raw.scale, hist: raw.hist, logit_hist: raw.logit_hist,
      bands: raw.bands.map(([b, count, rows]) => [b, count, decodeExamples(rows)]),
      promoted: decodeList(raw.promoted, false), suppressed: decodeList(raw.suppressed, false),
      nearest: decodeList(raw.nearest, false), cofiring: decodeList(raw.cofiring, true), cofiring_error: raw.cofiring_error,
    };
  }

  const records = {}, contexts = {};
  async function latentRecord(i) {
    const file = Math.floor(i / META.latents_per_file);
    await loadScript("data/latents_" + file + ".js");
    if (!records[i]) records[i] = decodeRecord(window.SAELAB_LATENTS[file][i - file * META.latents_per_file]);
    const rec = records[i];
    const examples = rec.top.concat(...rec.bands.map((b) => b[2]));
    const files = new Set(examples.map((e) => Math.floor(e[0] / META.contexts_per_file)));
    await Promise.all([...files].map((k) => loadScript("data/contexts_" + k + ".js")));
    return rec;
  }

  function contextTokens(ctx) {
    const k = Math.floor(ctx / META.contexts_per_file), T = META.context_size;
    if (!contexts[k]) {
      const view = bytesOf(window.SAELAB_CONTEXTS[k]), bytes = META.token_bytes, ids = [];
      for (let at = 0; at < view.byteLength; at += bytes) ids.push(unsigned(view, at, bytes));
      contexts[k] = ids;
    }
    const row = ctx - k * META.contexts_per_file;
    return contexts[k].slice(row * T, (row + 1) * T);
  }

  // ------------------------------------------------------------------ latent panel
  // An example is [site context, position, value, offset, act, offset, act, ...] (other nonzero activations).
  function exampleHtml(e, scale) {
    const [ctx, pos, value] = e;
    const tokens = contextTokens(ctx);
    const start = Math.max(pos - META.window_before, 0), stop = Math.min(pos + META.window_after + 1, tokens.length);
    const acts = new Array(stop - start).fill(0);
    acts[pos - start] = value;
    for (let j = 3; j + 1 < e.length; j += 2) acts[pos + e[j] - start] = e[j + 1];
    const spans = acts.map((a, j) => {
      const text = tokenText(tokens[start + j]);
      const alpha = scale <= 0 ? 0 : Math.max(0, Math.min(1, a / scale));
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
    return '<svg class="hist" viewBox="0 0 ' + W + " " + H + '" width="' + W + '">' + bars.join("") +
      '<text x="0" y="' + (H - 2) + '">' + fmt(edges[first]) + '</text><text x="' + (W - 40) + '" y="' + (H - 2) + '">' +
      fmt(edges[last + 1]) + '</text><text x="0" y="9">' + peak + " (log-spaced bins)</text></svg>";
  }

  function logitHistogramSvg(lh) {
    if (!lh) return '<p class="note">not available</p>';
    const [lo, hi, counts] = lh, nb = counts.length, peak = Math.max(...counts, 1);
    const W = 320, H = 90, bw = W / nb, step = (hi - lo) / nb, bars = [];
    counts.forEach((c, b) => {
      const h = c ? Math.max(1, (Math.log1p(c) / Math.log1p(peak)) * (H - 22)) : 0, mid = lo + (b + 0.5) * step;
      bars.push('<rect class="' + (mid < 0 ? "neg" : "pos") + '" x="' + (b * bw).toFixed(1) + '" y="' + (H - 14 - h).toFixed(1) +
        '" width="' + Math.max(bw - 1, 1).toFixed(1) + '" height="' + h.toFixed(1) + '"><title>' + fmt(lo + b * step) + "\u2013" +
        fmt(lo + (b + 1) * step) + ": " + c + " tokens</title></rect>");
    });
    return '<svg class="hist logits" viewBox="0 0 ' + W + " " + H + '" width="' + W + '">' + bars.join("") +
      '<text x="0" y="' + (H - 2) + '">' + fmt(lo) + '</text><text x="' + (W - 40) + '" y="' + (H - 2) + '">' + fmt(hi) +
      '</text><text x="0" y="9">logit weight over the vocabulary (log count)</text></svg>';
  }

  function latentLink(j, label) {
    return '<a class="latent" data-latent="' + j + '">#' + j + "</a> " + label;
  }

  function bandsHtml(rec, fires, scale) {
    if (!rec.bands.length) return '<p class="note">no firings</p>';
    const width = rec.scale / META.n_bands;
    return rec.bands.map(([b, count, examples]) =>
      '<h4 class="note">activation ' + fmt(b * width) + "\u2013" + fmt((b + 1) * width) + ": " + count + " firings (" +
      fmt((100 * count) / Math.max(fires, 1)) + "%), " + examples.length + " sampled</h4>" +
      examples.map((e) => exampleHtml(e, scale)).join("")).join("");
  }

  function explanationHtml(i) {
    const e = EXPL[i];
    if (!e) return "";
    const scores = ["detection", "fuzzing"].filter((k) => !missing(e[k])).map((k) => k + " " + fmt(e[k])).join(", ");
    return '<p class="explanation"><b>' + esc(e.text) + "</b>" + (scores ? ' <span class="note">(' + scores +
      (e.scored_on ? " on " + e.scored_on[0] + " + " + e.scored_on[1] + " held-out examples" : "") + ")</span>" : "") +
      ' <span class="note">by ' + esc(e.by || "?") + "</span></p>";
  }

  function renderPanel(i, rec) {
    const fires = INDEX.fires[i], scale = INDEX.max[i] || 0;
    const tokenList = (pairs) => pairs.length ? '<ul class="list">' + pairs.map(([t, v]) =>
      '<li><span class="toktag">' + esc(visible(tokenText(t))) + "</span> " + fmt(v) + "</li>").join("") + "</ul>"
      : '<p class="note">not available</p>';
    const cof = rec.cofiring.map(([j, c, jac]) => latentLink(j, "J " + fmt(jac) + " \u00b7 " + c + " (" + fmt((100 * c) / Math.max(fires, 1)) + "%)"));
    const panel = $("panel");
    panel.dataset.latent = String(i);
    panel.innerHTML =
      "<h2>Latent #" + i + (fires === 0 ? ' <span class="badge dead">dead</span>' : "") + "</h2>" + explanationHtml(i) +
      '<div class="stats"><span>density ' + fmt(INDEX.density[i]) + "</span><span>fires " + fires + "</span><span>max " +
      fmt(INDEX.max[i]) + "</span><span>mean " + fmt(INDEX.mean[i]) + "</span><span>max cos " + fmt(INDEX.maxcos[i]) + "</span></div>" +
      '<div class="cols"><div><h3>Activation histogram</h3>' + histogramSvg(rec.hist) + "</div><div><h3>Logit weights</h3>" +
      logitHistogramSvg(rec.logit_hist) + '<div class="lists"><div><h4 class="note">promoted</h4>' + tokenList(rec.promoted) +
      '</div><div><h4 class="note">suppressed</h4>' + tokenList(rec.suppressed) + "</div></div></div></div>" +
      '<h3>Top activations</h3><div id="top">' + rec.top.map((e) => exampleHtml(e, scale)).join("") + "</div>" +
      '<div class="cols"><div><h3>Nearest latents (decoder cos)</h3><ul class="list">' +
      rec.nearest.map(([j, c]) => "<li>" + latentLink(j, fmt(c)) + "</li>").join("") +
      '</ul></div><div><h3>Co-firing latents (Jaccard \u00b7 count)</h3><ul class="list">' + cof.map((l) => "<li>" + l + "</li>").join("") +
      "</ul></div></div>" + '<p class="note">Logits: ' + esc(META.logit_note) + " Co-firing: among each token's " +
      META.cofiring_cap + " strongest latents, exact counts of the listed partners; Jaccard = both / either; % of this latent's firings." +
      (rec.cofiring_error ? " Partners not listed co-fired at most " + rec.cofiring_error + " times." : "") + "</p>" +
      '<h3>Examples by activation interval</h3><div id="bands">' + bandsHtml(rec, fires, scale) + "</div>";
    panel.scrollTop = 0;
  }

  function showMissing(asked) {
    const panel = $("panel");
    panel.dataset.latent = "";
    panel.innerHTML = '<p class="error">Latent ' + esc(asked) + " does not exist: this SAE has latents 0\u2013" + (N - 1) + ".</p>";
  }

  async function showLatent() {
    const key = state.latent === null ? state.asked : state.latent;
    if (key === shownLatent) return;
    shownLatent = key;
    if (state.latent === null) {
      if (state.asked !== null) showMissing(state.asked);
      return;
    }
    const i = state.latent;
    try {
      const rec = await latentRecord(i);
      if (state.latent === i) renderPanel(i, rec);
    } catch (err) {
      $("panel").innerHTML = '<p class="error">' + esc(err.message) + "</p>";
    }
  }

  function bringPanelIntoView() {
    const r = $("panel").getBoundingClientRect();
    if (r.top < 0 || r.top > window.innerHeight - 40) $("panel").scrollIntoView({ block: "start" });
  }

  function render() {
    renderIndex();
    showLatent();
  }

  // ------------------------------------------------------------------ text box (served mode only)
  const live = { data: null, picked: null };

  function liveText(id) {
    return live.data.texts[id] !== undefined ? live.data.texts[id] : "<" + id + ">";
  }

  function renderLive() {
    const d = live.data;
    if (!d) return;
    const peak = d.acts ? Math.max(...d.acts, 0) : 0;
    const spans = d.ids.map((id, t) => {
      const a = d.acts ? d.acts[t] : 0, alpha = peak > 0 ? a / peak : 0;
      const dl = d.dloss && t < d.dloss.length ? "  \u0394loss(next) " + fmt(d.dloss[t]) : "";
      const title = JSON.stringify(liveText(id)) + (d.acts ? "  act " + fmt(a) : "") + dl + "  (" + d.top[t].length + " latents fire)";
      return '<span class="tok' + (t === live.picked ? " picked" : "") + '" data-t="' + t + '" style="background:rgba(255,152,0,' +
        alpha.toFixed(3) + ')" title="' + esc(title) + '">' + esc(visible(liveText(id))) + "</span>";
    });
    let html = (d.cut ? '<p class="note">The text was cut to ' + d.ids.length + " tokens.</p>" : "") +
      '<div id="live-tokens">' + spans.join("") + "</div>";
    if (live.picked !== null) {
      const t = live.picked;
      html += '<p id="live-token-info">Latents firing on ' + esc(JSON.stringify(liveText(d.ids[t]))) + ": " +
        (d.top[t].length ? d.top[t].map(([j, a]) => latentLink(j, fmt(a))).join(", ") : "none") + "</p>";
    } else {
      html += '<p class="note">Click a token to list the latents that fire on it.</p>';
    }
    if (d.latent !== null) {
      const rows = d.effects.map(([t, up, down]) => "<tr><td>" + esc(visible(liveText(d.ids[t]))) + "</td><td>" + fmt(d.acts[t]) +
        "</td><td>" + (t < d.dloss.length ? fmt(d.dloss[t]) : "\u2013") + "</td><td>" +
        up.map(([k, v]) => '<span class="toktag">' + esc(visible(liveText(k))) + "</span>" + fmt(v)).join(" ") + "</td><td>" +
        down.map(([k, v]) => '<span class="toktag">' + esc(visible(liveText(k))) + "</span>" + fmt(v)).join(" ") + "</td></tr>");
      html += "<h3>Latent #" + d.latent + " on this text: " + d.effects.length + " firings</h3>" + (rows.length
        ? '<table class="effects" id="live-effects"><tr><th>token</th><th>act</th><th title="loss of the next token with the latent removed minus without: &gt; 0 where it helped">\u0394loss(next)</th><th>log-prob raised most</th><th>lowered most</th></tr>' + rows.join("") + "</table>"
        : '<p class="note">It does not fire here.</p>') +
        '<p class="note">Removing the latent: its activation times its decoder row is subtracted at the hook wherever it fires; the ' +
        "columns give the change in the next token's loss and the log-probabilities it moved most at each firing.</p>";
    }
    $("live-out").innerHTML = html;
  }

  async function runLive() {
    const text = $("live-text").value;
    if (!text.trim()) return;
    const asked = $("live-latent").value.trim();
    const latent = asked === "" ? state.latent : parseInt(asked, 10);
    $("live-run").disabled = true;
    try {
      const response = await fetch("api/run", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ text, latent }) });
      const body = await response.json();
      if (!response.ok) throw new Error(body.error || response.statusText);
      live.data = body;
      live.picked = null;
      renderLive();
    } catch (err) {
      $("live-out").innerHTML = '<p class="error">' + esc(err.message) + "</p>";
    } finally {
      $("live-run").disabled = false;
    }
  }

  async function enableLive() {
    if (!location.protocol.startsWith("http")) return;
    try {
      const info = await (await fetch("api/info")).json();
      if (!info.live) return;
    } catch (err) {
      return;  // a plain static server: no text box
    }
    $("live").hidden = false;
    $("live-run").addEventListener("click", runLive);
    $("live-text").addEventListener("keydown", (ev) => { if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) runLive(); });
    $("live-out").addEventListener("click", (ev) => {
      const tok = ev.target.closest("[data-t]");
      if (tok) { live.picked = parseInt(tok.dataset.t, 10); renderLive(); }
    });
  }

  // ------------------------------------------------------------------ events
  let typing = null;
  $("search").addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => setHash({ q: $("search").value, page: 0 }), 150);
  });
  for (const id of ["dmin", "dmax"]) {
    $(id).addEventListener("change", () => setHash({ [id]: numberOrNull($(id).value), page: 0 }));
  }
  $("hide-dead").addEventListener("change", () => setHash({ hideDead: $("hide-dead").checked, page: 0 }));
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
    if (target && target.id !== "panel") {
      setHash({ latent: parseInt(target.dataset.latent, 10) });
      bringPanelIntoView();
    }
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.ctrlKey || ev.metaKey || ev.altKey || /^(INPUT|TEXTAREA|SELECT)$/.test(document.activeElement.tagName)) return;
    const step = ev.key === "j" || ev.key === "ArrowDown" ? 1 : ev.key === "k" || ev.key === "ArrowUp" ? -1 : 0;
    if (!step || !order.length) return;
    ev.preventDefault();
    const at = order.indexOf(state.latent);
    const next = order[at < 0 ? 0 : Math.max(0, Math.min(order.length - 1, at + step))];
    state.latent = next;  // now, so that a key pressed before the hashchange event moves on from here
    setHash({ latent: next, page: Math.floor(order.indexOf(next) / PAGE_SIZE) });
    const row = document.querySelector('#index tr[data-latent="' + next + '"]');
    if (row) row.scrollIntoView({ block: "nearest" });
  });
  window.addEventListener("hashchange", () => { readHash(); render(); });
  const held = META.held_out === true ? "held out from training" : META.held_out === false ? "not held out" : "";
  $("summary").textContent = N + " latents \u00b7 " + META.hook_name + " \u00b7 " + META.n_tokens.toLocaleString() +
    " tokens" + (META.start_context ? " from context " + META.start_context : "") + (held ? " (" + held + ")" : "") +
    (META.sae ? " \u00b7 " + META.sae : "") + (META.model ? " \u00b7 " + META.model : "");
  readHash();
  render();
  enableLive();
})();
