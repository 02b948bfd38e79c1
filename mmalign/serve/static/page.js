// The search page: asks /indexes what is served, sends /search, shows a grid of cards.
"use strict";

const $ = (id) => document.getElementById(id);
let served = null;

function token() {
  return $("token").value || new URLSearchParams(location.hash.slice(1)).get("token") || "";
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (token()) h.Authorization = "Bearer " + token();
  return h;
}

function withToken(url) {
  return token() ? url + "?token=" + encodeURIComponent(token()) : url;
}

function option(select, value) {
  const o = document.createElement("option");
  o.value = o.textContent = value;
  select.appendChild(o);
}

function fillTargets() {
  const info = served.indexes[$("index").value];
  $("target").replaceChildren();
  Object.keys(info.targets).forEach((t) => option($("target"), t));
  const image = Object.keys(info.targets).find((t) => served.modalities[t] === "image");
  if (image) $("target").value = image;  // the usual gallery; any other can be picked
  fillDims();
}

function fillDims() {
  const dims = served.indexes[$("index").value].targets[$("target").value];
  $("dim").replaceChildren();
  dims.slice().reverse().forEach((d) => option($("dim"), d));
}

function readBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.split(",", 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function typed(kind) {
  return Object.entries(served.modalities).find(([, type]) => type === kind);
}

async function buildQuery() {
  const query = {};
  if ($("text").value.trim() && typed("text")) query.text = $("text").value;
  for (const kind of ["image", "audio"]) {
    const file = $(kind).files[0];
    if (file && typed(kind)) query[kind] = await readBase64(file);
  }
  return query;
}

function card(row) {
  const div = document.createElement("div");
  div.className = "card";
  div.dataset.key = row.key;
  const head = document.createElement("div");
  head.innerHTML = '<span class="rank"></span> <span class="score"></span>';
  head.querySelector(".rank").textContent = "#" + row.rank;
  head.querySelector(".score").textContent = row.score.toFixed(4);
  div.appendChild(head);
  const order = { image: 0, audio: 1, text: 2 };
  const items = Object.entries(row.items || {}).sort(
    ([a], [b]) => (order[served.modalities[a]] ?? 3) - (order[served.modalities[b]] ?? 3));
  for (const [modality, url] of items) {
    const kind = served.modalities[modality];
    if (kind === "image") {
      const img = document.createElement("img");
      img.src = withToken(url);
      img.alt = row.key;
      div.appendChild(img);
    } else if (kind === "audio") {
      const audio = document.createElement("audio");
      audio.controls = true;
      audio.src = withToken(url);
      div.appendChild(audio);
    } else if (kind === "text") {
      const p = document.createElement("p");
      p.className = "text";
      fetch(withToken(url)).then((r) => r.text()).then((t) => { p.textContent = t; });
      div.appendChild(p);
    }
  }
  const key = document.createElement("div");
  key.className = "key";
  key.textContent = row.key;
  div.appendChild(key);
  const dl = document.createElement("dl");
  for (const [name, value] of Object.entries(row)) {
    if (["rank", "score", "key", "items"].includes(name) || name.startsWith("present_")) continue;
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = name;
    dd.textContent = typeof value === "object" ? JSON.stringify(value) : String(value);
    dl.append(dt, dd);
  }
  div.appendChild(dl);
  return div;
}

async function search(event) {
  event.preventDefault();
  $("error").textContent = "";
  const body = {
    index: $("index").value,
    target: $("target").value,
    k: Number($("k").value),
    dim: Number($("dim").value),
    query: await buildQuery(),
  };
  const started = performance.now();
  const response = await fetch("/search", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  const answer = await response.json();
  if (!response.ok) {
    $("error").textContent = answer.detail || response.statusText;
    return;
  }
  $("results").replaceChildren(...answer.results.map(card));
  $("status").textContent = answer.results.length + " results from " + answer.index + "/" +
    answer.target + " at dim " + answer.dim + " in " + Math.round(performance.now() - started) + " ms";
  document.body.dataset.searched = String(Number(document.body.dataset.searched || 0) + 1);
}

async function start() {
  const response = await fetch("/indexes", { headers: headers() });
  served = await response.json();
  if (!response.ok) {
    $("error").textContent = served.detail;
    return;
  }
  Object.keys(served.indexes).forEach((name) => option($("index"), name));
  fillTargets();
  $("index").addEventListener("change", fillTargets);
  $("target").addEventListener("change", fillDims);
  $("search").addEventListener("submit", search);
  document.body.dataset.ready = "true";
}

start();
