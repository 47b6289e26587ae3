// visiond label: one inbox image at a time (or a grid), keys to label, the server does the moving.
"use strict";
(() => {
  const TOKEN = document.querySelector('meta[name="visiond-token"]').content;
  const GRID_MAX = 300;  // thumbnails drawn at once; the rest come as these are labelled
  const POLL_MS = 5000;  // new captures appear without a reload
  const $ = (id) => document.getElementById(id);
  const ui = {
    state: null, stateText: "", currentId: null, selected: null,
    grid: false, picked: new Set(), anchorId: null, busy: false, ticket: 0, shown: 0,
  };

  async function api(path, body) {
    const init = body === undefined ? { cache: "no-store" } : {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Visiond-Token": TOKEN },
      body: JSON.stringify(body),
    };
    const res = await fetch(path, init);
    let data = {};
    try { data = await res.json(); } catch (e) { /* not JSON: use the status line */ }
    if (!res.ok) throw new Error(data.error || `${res.status} ${res.statusText}`);
    return data;
  }

  function say(text, kind) {
    const m = $("message");
    m.textContent = text;
    m.className = kind || "";
  }

  // One change at a time: keys pressed while a request is in flight are ignored, never queued.
  async function run(action) {
    if (ui.busy) return;
    ui.busy = true;
    document.body.classList.add("busy");
    try { await action(); } catch (e) { say(e.message, "error"); } finally {
      ui.busy = false;
      document.body.classList.remove("busy");
    }
  }

  // Responses can overtake each other; only the newest request's state is drawn.
  async function refresh() {
    const ticket = ++ui.ticket;
    const state = await api("/api/state");
    if (ticket < ui.shown) return;
    ui.shown = ticket;
    const text = JSON.stringify(state);
    if (text === ui.stateText) return;
    ui.state = state;
    ui.stateText = text;
    render();
  }

  const items = () => (ui.state ? ui.state.items : []);
  const current = () => items()[0] || null;
  const guessOf = (item) => (item && item.prediction ? item.prediction.label : null);
  const score = (s) => (typeof s === "number" ? s.toFixed(2) : "?");
  const when = (t) => (t ? t.replace("T", " ").replace(/\.\d+/, "").replace("Z", " UTC") : "");

  function render() {
    const s = ui.state;
    const item = current();
    if (!item || item.id !== ui.currentId) {  // a new image: start from the model's guess
      ui.currentId = item ? item.id : null;
      const g = guessOf(item);
      ui.selected = g && s.classes.includes(g) ? g : null;
    }
    $("dataset").textContent = s.dataset;
    $("progress").textContent = `${s.labelled} / ${s.total} labelled, ${s.left} left` +
      (s.discarded ? `, ${s.discarded} discarded` : "");
    $("mode").textContent = ui.grid ? "grid" : "single";
    $("undo").disabled = s.undo === 0;
    $("empty").hidden = item !== null;
    $("single").hidden = ui.grid || !item;
    $("grid").hidden = !ui.grid || !item;
    $("accept").disabled = ui.grid || !item;
    $("skip").disabled = ui.grid || !item;
    $("discard").disabled = !item;
    renderClasses(item);
    if (ui.grid) renderGrid();
    else if (item) renderSingle(item);
  }

  function renderClasses(item) {
    const guess = ui.grid ? null : guessOf(item);
    const nav = $("classes");
    nav.replaceChildren();
    if (!ui.state.classes.length) say("No classes yet: add one below.", "error");
    ui.state.classes.forEach((name, i) => {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "cls";
      b.dataset.class = name;
      b.classList.toggle("selected", !ui.grid && name === ui.selected);
      b.classList.toggle("guess", name === guess);
      if (i < 9) {
        const k = document.createElement("kbd");
        k.textContent = String(i + 1);
        b.append(k, " ");
      }
      b.append(name);
      if (name === guess) {
        const tag = document.createElement("small");
        tag.textContent = "model";
        b.append(" ", tag);
      }
      b.addEventListener("click", (ev) => { ev.currentTarget.blur(); chooseClass(name); });
      nav.append(b);
    });
  }

  function renderSingle(item) {
    const img = $("image");
    if (img.dataset.id !== item.id) {
      img.dataset.id = item.id;
      img.style.width = img.style.height = "";
      img.src = item.url;
    }
    const p = item.prediction;
    const others = p && Array.isArray(p.top) ? p.top.filter((t) => t.label !== p.label).slice(0, 3) : [];
    $("guess").textContent = p
      ? `model: ${p.label} ${score(p.score)}` + (others.length ? ` · then ${others.map((t) => `${t.label} ${score(t.score)}`).join(", ")}` : "")
      : "model: no guess";
    const model = p && p.model ? [p.model.name, p.model.version].filter(Boolean).join(" ") : "";
    $("meta").textContent = [item.camera && `camera ${item.camera}`, when(item.captured_at),
      item.rule && `rule ${item.rule}`, model && `model ${model}`, item.skipped && "skipped once",
      item.id].filter(Boolean).join(" · ");
  }

  // Whole-pixel scaling of small frames keeps edges sharp (CSS image-rendering: pixelated).
  function fit() {
    const img = $("image");
    if (!img.naturalWidth || $("single").hidden) return;
    const maxW = Math.max(64, $("single").clientWidth - 16);
    const maxH = Math.max(64, window.innerHeight * 0.6);
    let k = Math.min(maxW / img.naturalWidth, maxH / img.naturalHeight);
    if (k >= 1) k = Math.floor(k);
    img.style.width = `${Math.round(img.naturalWidth * k)}px`;
    img.style.height = `${Math.round(img.naturalHeight * k)}px`;
  }

  function renderGrid() {
    const list = items().slice(0, GRID_MAX);
    const ids = new Set(list.map((i) => i.id));
    for (const id of [...ui.picked]) if (!ids.has(id)) ui.picked.delete(id);
    const wrap = $("thumbs");
    wrap.replaceChildren();
    list.forEach((item, index) => {
      const f = document.createElement("figure");
      f.className = "thumb";
      f.classList.toggle("picked", ui.picked.has(item.id));
      f.dataset.id = item.id;
      const img = document.createElement("img");
      img.src = item.url;
      img.alt = item.id;
      img.draggable = false;
      const cap = document.createElement("figcaption");
      cap.textContent = item.prediction ? `${item.prediction.label} ${score(item.prediction.score)}` : "no guess";
      f.append(img, cap);
      f.addEventListener("click", (ev) => pick(index, ev.shiftKey));
      wrap.append(f);
    });
    const more = items().length > GRID_MAX ? ` · showing the first ${GRID_MAX} of ${items().length}` : "";
    $("grid-count").textContent = `${ui.picked.size} selected${more}`;
  }

  function pick(index, range) {
    const list = items();
    const anchor = list.findIndex((i) => i.id === ui.anchorId);
    if (range && anchor >= 0) {
      for (let i = Math.min(anchor, index); i <= Math.max(anchor, index); i++) ui.picked.add(list[i].id);
    } else {
      const id = list[index].id;
      if (ui.picked.has(id)) ui.picked.delete(id); else ui.picked.add(id);
      ui.anchorId = id;
    }
    render();
  }

  function chooseClass(name) {
    if (ui.grid) { assign(name); return; }
    ui.selected = name;
    render();
  }

  function accept() {
    const item = current();
    if (!item) return;
    if (!ui.selected) { say("Choose a class first (keys 1–9).", "error"); return; }
    const label = ui.selected;
    run(async () => {
      await api("/api/accept", { ids: [item.id], label });
      say(`${item.id} → ${label}`);
      await refresh();
    });
  }

  function assign(label) {
    const ids = items().filter((i) => ui.picked.has(i.id)).map((i) => i.id);
    if (!ids.length) { say("Select images first (click, shift-click).", "error"); return; }
    run(async () => {
      const r = await api("/api/accept", { ids, label });
      ui.picked.clear();
      ui.anchorId = null;
      say(`${r.accepted.length} images → ${label}`);
      await refresh();
    });
  }

  function undo() {
    run(async () => {
      const r = await api("/api/undo", {});
      say(`undone: ${r.restored.length} back in the inbox`);
      await refresh();
    });
  }

  function skip() {
    const item = current();
    if (!item) return;
    run(async () => {
      await api("/api/skip", { id: item.id });
      say(`skipped ${item.id}`);
      await refresh();
    });
  }

  // Not worth labelling (blurred, a hand in view, no part): set aside in discarded/, Backspace brings it back.
  function discard() {
    const ids = ui.grid ? items().filter((i) => ui.picked.has(i.id)).map((i) => i.id)
      : (current() ? [current().id] : []);
    if (!ids.length) { if (ui.grid) say("Select images first (click, shift-click).", "error"); return; }
    run(async () => {
      const r = await api("/api/discard", { ids });
      ui.picked.clear();
      ui.anchorId = null;
      say(`${r.set_aside.length} discarded (⌫ undoes)`);
      await refresh();
    });
  }

  function toggleGrid() {
    ui.grid = !ui.grid;
    document.body.classList.toggle("grid-mode", ui.grid);
    render();
    fit();
  }

  document.addEventListener("keydown", (ev) => {
    if (ev.target.closest && ev.target.closest("input, textarea")) return;
    if (ev.ctrlKey || ev.metaKey || ev.altKey || !ui.state) return;
    const k = ev.key;
    if (ev.repeat && k !== "Escape") { ev.preventDefault(); return; }  // a held key labels one image, not fifty
    if (/^[1-9]$/.test(k)) {
      const name = ui.state.classes[Number(k) - 1];
      if (name) chooseClass(name);
    } else if (k === "Enter") {
      if (!ui.grid) accept();
    } else if (k === "Backspace") {
      undo();
    } else if (k === "s" || k === "S") {
      if (!ui.grid) skip();
    } else if (k === "x" || k === "X" || k === "Delete") {
      discard();
    } else if (k === "g" || k === "G") {
      toggleGrid();
    } else if (k === "a" && ui.grid) {
      items().slice(0, GRID_MAX).forEach((i) => ui.picked.add(i.id));
      render();
    } else if (k === "Escape") {
      ui.picked.clear();
      ui.anchorId = null;
      render();
    } else {
      return;
    }
    ev.preventDefault();  // also keeps Enter from "clicking" a focused button a second time
  });

  const button = (id, fn) => $(id).addEventListener("click", (ev) => { ev.currentTarget.blur(); fn(); });
  button("accept", accept);
  button("skip", skip);
  button("undo", undo);
  button("discard", discard);
  button("toggle-grid", toggleGrid);
  $("add-class").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = $("new-class");
    const name = input.value.trim();
    if (!name) return;
    run(async () => {
      await api("/api/classes", { name });
      input.value = "";
      input.blur();
      say(`class ${name} added`);
      await refresh();
    });
  });
  $("image").addEventListener("load", fit);
  window.addEventListener("resize", fit);
  setInterval(() => { if (!ui.busy && !document.hidden) refresh().catch(() => say("server not reachable", "error")); }, POLL_MS);
  run(refresh);
})();
