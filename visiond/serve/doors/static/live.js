"use strict";
// visiond live: polls /api/live about once a second and each tile's newest frame about twice a
// second, only while the tab is visible and never wider than the tile shows. No framework, no
// inline code or style, so the page runs under a strict Content-Security-Policy.
(() => {
  const LIVE_MS = 1000;
  const FRAME_MS = 500;
  const MAX_WIDTH = 640;
  const COLOURS = { ok: "#2fbf55", defect: "#ff5252", unknown: "#8a8f98" };

  const $ = (id) => document.getElementById(id);
  const tiles = new Map(); // camera name -> tile
  let token = sessionStorage.getItem("visiond-token") || "";
  let needToken = false;
  let liveBusy = false;
  let liveTimer = null;
  let stripKey = null;
  let globalRecipe = null;

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined) node.setAttribute(k, v);
    }
    node.append(...children.filter((c) => c !== null && c !== undefined));
    return node;
  }

  async function api(path) {
    const headers = token ? { Authorization: "Bearer " + token } : {};
    const r = await fetch(path, { headers, cache: "no-store" });
    if (r.status === 401) askToken();
    return r;
  }

  function askToken() {
    needToken = true;
    $("token-form").hidden = false;
  }

  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    token = $("token").value.trim();
    sessionStorage.setItem("visiond-token", token);
    needToken = false;
    $("token-form").hidden = true;
    resume();
  });

  // ---- the live JSON --------------------------------------------------------------------
  async function pollLive() {
    clearTimeout(liveTimer);
    liveTimer = null;
    if (document.hidden || needToken || liveBusy) return;
    liveBusy = true;
    try {
      const r = await api("/api/live");
      if (r.ok) render(await r.json());
      else if (r.status !== 401) healthError(`visiond answered HTTP ${r.status}`);
    } catch (e) {
      healthError("visiond unreachable");
    } finally {
      liveBusy = false;
      if (!document.hidden && !needToken) liveTimer = setTimeout(pollLive, LIVE_MS);
    }
  }

  function render(data) {
    globalRecipe = data.recipe;
    $("node").textContent = data.node;
    $("recipe").textContent = "recipe " + (data.recipe ?? "(config)");
    const names = new Set(data.cameras.map((c) => c.name));
    for (const [name, t] of tiles) {
      if (!names.has(name)) {
        t.article.remove();
        tiles.delete(name);
      }
    }
    for (const cam of data.cameras) {
      let t = tiles.get(cam.name);
      if (!t) {
        t = makeTile(cam);
        tiles.set(cam.name, t);
        $("tiles").append(t.article);
        scheduleFrame(t, 0);
      }
      t.cam = cam;
      const h = (data.health.cameras || {})[cam.name];
      t.state.className = "cam-state " + (h ? (h.ok ? "good" : "bad") : "");
      t.state.textContent = h ? (h.ok ? "live" : "no frames") : "";
      renderStation(t, cam);
      draw(t);
    }
    renderHealth(data.health);
    renderStrip(data.strip);
  }

  // ---- tiles ------------------------------------------------------------------------------
  function makeTile(cam) {
    const img = el("img", { class: "frame", alt: `${cam.name}: newest frame` });
    const canvas = el("canvas", { class: "rois", "data-boxes": "0" });
    const waiting = el("p", { class: "waiting" }, "waiting for the first frame…");
    const view = el("div", { class: "view" }, img, canvas, waiting);
    const state = el("span", { class: "cam-state" });
    const station = el("div", { class: "station" });
    const article = el("article", { class: "tile", "data-camera": cam.name },
      el("header", {}, el("h2", {}, cam.name), el("span", { class: "mode" }, cam.mode), state), view, station);
    const t = { name: cam.name, cam, article, view, img, canvas, waiting, state, station,
      index: null, width: null, url: null, shown: null, busy: false, timer: null };
    img.addEventListener("load", () => {
      if (t.shown && t.shown !== t.url) URL.revokeObjectURL(t.shown);
      t.shown = img.src;
      draw(t);
    });
    new ResizeObserver(() => draw(t)).observe(view);
    return t;
  }

  function wantWidth(t) {
    const shown = t.view.clientWidth * (window.devicePixelRatio || 1);
    return shown > 0 ? Math.min(MAX_WIDTH, Math.ceil(shown / 16) * 16) : MAX_WIDTH;
  }

  function scheduleFrame(t, ms) {
    clearTimeout(t.timer);
    t.timer = setTimeout(() => loadFrame(t), ms);
  }

  async function loadFrame(t) {
    t.timer = null;
    if (document.hidden || needToken || t.busy || tiles.get(t.name) !== t) return;
    t.busy = true;
    const started = performance.now();
    try {
      const w = wantWidth(t);
      let path = `/api/frame/${encodeURIComponent(t.name)}.jpg?w=${w}`;
      if (t.index !== null && t.width === w) path += `&since=${t.index}`; // 204 when the camera has nothing newer
      const r = await api(path);
      if (r.status === 200) {
        const blob = await r.blob();
        t.url = URL.createObjectURL(blob);
        t.img.src = t.url;
        t.index = r.headers.get("X-Frame-Index");
        t.width = w;
        t.img.dataset.index = t.index;
        t.waiting.hidden = true;
      } else if (r.status === 503) {
        t.waiting.hidden = false;
        t.waiting.textContent = "waiting for the first frame…";
      } else if (r.status !== 204 && r.status !== 401) {
        t.waiting.hidden = false;
        t.waiting.textContent = `frame: HTTP ${r.status}`;
      }
    } catch (e) {
      t.waiting.hidden = false;
      t.waiting.textContent = "visiond unreachable";
    } finally {
      t.busy = false;
      if (!document.hidden && !needToken && tiles.get(t.name) === t) {
        scheduleFrame(t, Math.max(0, FRAME_MS - (performance.now() - started)));
      }
    }
  }

  function draw(t) {
    const c = t.canvas;
    const dpr = window.devicePixelRatio || 1;
    const W = Math.round(t.view.clientWidth * dpr);
    const H = Math.round(t.view.clientHeight * dpr);
    if (c.width !== W) c.width = W;
    if (c.height !== H) c.height = H;
    const g = c.getContext("2d");
    g.clearRect(0, 0, W, H);
    const f = t.cam.frame;
    if (!f || !W || !H) {
      c.dataset.boxes = "0";
      return;
    }
    const s = Math.min(W / f.width, H / f.height); // the image is drawn with object-fit: contain
    const ox = (W - f.width * s) / 2;
    const oy = (H - f.height * s) / 2;
    const th = Math.round(16 * dpr);
    const used = new Set();
    g.font = `${Math.round(12 * dpr)}px system-ui, sans-serif`;
    g.lineWidth = Math.max(2, Math.round(2 * dpr));
    for (const roi of t.cam.rois) {
      const [x, y, w, h] = roi.rect || [0, 0, f.width, f.height];
      const colour = COLOURS[roi.state] || COLOURS.unknown;
      const bx = ox + x * s;
      const by = oy + y * s;
      g.strokeStyle = colour;
      g.strokeRect(bx, by, w * s, h * s);
      const text = roi.label === null ? `${roi.name} ?` : `${roi.name} ${roi.label} ${Number(roi.score).toFixed(2)}`;
      let ly = by;
      while (used.has(`${Math.round(bx)},${Math.round(ly)}`)) ly += th; // ROIs sharing a corner: labels stack
      used.add(`${Math.round(bx)},${Math.round(ly)}`);
      g.fillStyle = colour;
      g.fillRect(bx, ly, g.measureText(text).width + 6 * dpr, th);
      g.fillStyle = "#000";
      g.fillText(text, bx + 3 * dpr, ly + th - 4 * dpr);
    }
    c.dataset.boxes = String(t.cam.rois.length);
    c.dataset.states = t.cam.rois.map((r) => r.state).join(",");
  }

  function modelText(models) {
    const names = new Set(Object.values(models || {}).map((m) => `${m.name} ${m.version}`));
    return names.size ? [...names].join(", ") : "–";
  }

  function renderStation(t, cam) {
    const st = cam.station;
    if (!st) {
      t.station.replaceChildren(el("span", { class: "meta" }, `model ${modelText(cam.models)}`));
      return;
    }
    const count = (kind, label, n) => el("span", { class: `count ${kind}`, "data-count": kind }, `${label} ${n}`);
    const last = st.last
      ? el("span", { class: `last ${st.last.verdict}` },
        `last: ${st.last.verdict} ${st.last.part_id ?? ""}${st.last.reason ? ` (${st.last.reason})` : ""}`)
      : el("span", { class: "last" }, "no part yet today");
    const models = Object.keys(st.models || {}).length ? st.models : cam.models;
    t.station.replaceChildren(
      count("ok", "OK", st.ok), count("ng", "NG", st.ng), count("error", "ERROR", st.error),
      el("span", { class: "yield" }, st.yield === null ? "yield –" : `yield ${(st.yield * 100).toFixed(1)} %`),
      last,
      el("span", { class: "meta" },
        `station ${st.state} · recipe ${st.recipe ?? globalRecipe ?? "(config)"} · model ${modelText(models)}`));
  }

  // ---- health -------------------------------------------------------------------------------
  function healthItem(good, text) {
    return el("li", { class: good ? "good" : "bad" }, text);
  }

  function renderHealth(h) {
    const items = [healthItem(h.ok, h.ok ? "healthy" : "unhealthy")];
    if ("mqtt_connected" in h) items.push(healthItem(h.mqtt_connected, h.mqtt_connected ? "broker connected" : "broker away"));
    if (h.spool !== undefined && h.spool !== null) {
      const n = typeof h.spool === "object" ? h.spool.messages : h.spool;
      items.push(healthItem(!n, `spool ${n} waiting`));
    }
    if ("inference_alive" in h) items.push(healthItem(h.inference_alive, h.inference_alive ? "inference running" : "inference stopped"));
    for (const [name, c] of Object.entries(h.cameras || {})) {
      const age = c.last_frame_age_s === null ? "no frame yet" : `last frame ${c.last_frame_age_s.toFixed(1)} s ago`;
      items.push(healthItem(c.ok, `${name}: ${age}`));
    }
    $("health").replaceChildren(...items);
  }

  function healthError(text) {
    $("health").replaceChildren(healthItem(false, text));
  }

  // ---- last NG parts ---------------------------------------------------------------------------
  function renderStrip(items) {
    const key = items.map((i) => `${i.job_id}:${i.thumbnail_ready}`).join(",");
    if (key === stripKey) return;
    stripKey = key;
    $("strip-empty").hidden = items.length > 0;
    const old = new Map([...$("strip").children].map((li) => [`${li.dataset.job}:${li.dataset.ready}`, li]));
    $("strip").replaceChildren(...items.map((i) => old.get(`${i.job_id}:${i.thumbnail_ready}`) || stripItem(i)));
  }

  function stripItem(item) {
    let picture;
    if (item.thumbnail && item.thumbnail_ready) {
      picture = el("img", { alt: `evidence of part ${item.part_id}` });
      loadEvidence(picture, item.thumbnail);
    } else {
      picture = el("span", { class: "noimage" }, item.thumbnail ? "saving evidence…" : (item.reason || "no image"));
    }
    const when = item.decided_at ? new Date(item.decided_at).toLocaleTimeString() : "";
    const button = el("button", { type: "button", class: item.verdict, "data-job": item.job_id }, picture,
      el("span", { class: "caption" }, `${item.verdict} ${item.camera} · ${item.part_id ?? ""}`),
      el("span", { class: "caption" }, when));
    button.addEventListener("click", () => openDetail(item, picture));
    return el("li", { "data-job": item.job_id, "data-ready": String(item.thumbnail_ready) }, button);
  }

  function evidenceUrl(path) {
    return "/api/evidence/" + path.split("/").map(encodeURIComponent).join("/");
  }

  async function loadEvidence(img, path) {
    try {
      const r = await api(evidenceUrl(path));
      if (r.ok) {
        img.src = URL.createObjectURL(await r.blob());
        img.dataset.loaded = "1";
        return;
      }
      img.alt = `evidence: HTTP ${r.status}`;
    } catch (e) {
      img.alt = "evidence: visiond unreachable";
    }
  }

  async function openDetail(item, picture) {
    $("detail-title").textContent = `${item.verdict} · ${item.camera} · part ${item.part_id ?? ""}`;
    const img = $("detail-image");
    const hasImage = picture.tagName === "IMG" && picture.dataset.loaded === "1";
    img.hidden = !hasImage;
    $("detail-noimage").hidden = hasImage;
    if (hasImage) img.src = picture.src; // the thumbnail is the full-size evidence file, shown small
    $("detail-json").textContent = "loading…";
    $("detail").showModal();
    try {
      const r = await api(`/api/result/${encodeURIComponent(item.job_id)}`);
      $("detail-json").textContent = r.ok ? JSON.stringify(await r.json(), null, 2) : `HTTP ${r.status}`;
    } catch (e) {
      $("detail-json").textContent = "visiond unreachable";
    }
  }

  $("detail-close").addEventListener("click", () => $("detail").close());

  // ---- only while visible -----------------------------------------------------------------------
  function resume() {
    pollLive();
    for (const t of tiles.values()) scheduleFrame(t, 0);
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) resume();
  });
  resume();
})();
