// The Astra web player: create a session, send key presses as steps, play frames as they stream in.
// Steps are server-sent events over a POST, read with fetch (so the Authorization header can be set).
"use strict";

const $ = (id) => document.getElementById(id);
const KEYS = { w: "W", a: "A", s: "S", d: "D", q: "Q", e: "E",
               ArrowUp: "ArrowUp", ArrowDown: "ArrowDown", ArrowLeft: "ArrowLeft", ArrowRight: "ArrowRight" };
let service = null, session = null, busy = false, shown = 0;
const pending = [], frames = [];

function headers(json = true) {
  const h = json ? { "content-type": "application/json" } : {};
  const token = $("token").value.trim();
  if (token) h.authorization = "Bearer " + token;
  return h;
}

function fail(message) { $("error").textContent = message; }

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.body !== undefined) });
  if (!response.ok) {
    let message = response.statusText;
    try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
    throw new Error(`${response.status}: ${message}`);
  }
  return response;
}

// a start image when none is chosen: sky, ground, a few boxes (a scene the demo worlds resemble)
function generatedImage() {
  const c = document.createElement("canvas");
  c.width = service.width; c.height = service.height;
  const g = c.getContext("2d");
  g.fillStyle = "#7ab6f0"; g.fillRect(0, 0, c.width, c.height / 2);
  g.fillStyle = "#5c8f3a"; g.fillRect(0, c.height / 2, c.width, c.height / 2);
  const colors = ["#c0392b", "#e6b800", "#8e44ad", "#2c3e50"];
  for (let i = 0; i < 4; i++) {
    g.fillStyle = colors[i];
    g.fillRect(c.width * (0.1 + 0.22 * i), c.height * 0.42, c.width * 0.12, c.height * 0.16);
  }
  return c.toDataURL("image/png").split(",")[1];
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.split(",")[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function start() {
  fail("");
  $("status").textContent = "creating a session…";
  try {
    const file = $("image").files[0];
    const body = {
      prompt: $("prompt").value, modality: $("modality").value, seed: Number($("seed").value) || 0,
      image_base64: file ? await readFile(file) : generatedImage(),
    };
    const info = await (await api("/v1/sessions", { method: "POST", body: JSON.stringify(body) })).json();
    session = info;
    frames.length = 0; pending.length = 0;
    info.start_frames.forEach((f) => frames.push(f));
    $("step").textContent = info.step;
    $("download").hidden = false;
    $("status").textContent = `session ${info.session_id.slice(0, 8)}… ready: press a key`;
  } catch (err) { fail(err.message); $("status").textContent = ""; }
}

// keys -> driving commands: W/S throttle, A/D (or arrows) steer while rolling
const DRIVE = { W: [8, 0], S: [-3, 0], A: [6, 0.5], D: [6, -0.5], ArrowLeft: [6, 0.5], ArrowRight: [6, -0.5],
                ArrowUp: [12, 0], ArrowDown: [0, 0], Q: [4, 0], E: [4, 0] };

function commands(key) {
  const frames = service.chunk_latents;
  if (session.modality === "driving") {
    const [throttle, steer] = DRIVE[key];
    return { drive: [{ throttle, steer, frames }] };
  }
  return { keys: [{ keys: [key], frames }] };
}

// one SSE step: events accepted / frames / done / error
async function step(key) {
  busy = true;
  try {
    const response = await api(`/v1/sessions/${session.session_id}/step`,
      { method: "POST", body: JSON.stringify(commands(key)) });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        handle(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
      }
    }
  } catch (err) { fail(err.message); }
  busy = false;
  next();
}

function handle(block) {
  let event = "message", data = "";
  for (const line of block.split("\n")) {
    if (line.startsWith("event: ")) event = line.slice(7);
    else if (line.startsWith("data: ")) data += line.slice(6);
  }
  const payload = JSON.parse(data || "{}");
  if (event === "frames") payload.frames.forEach((f) => frames.push(f));
  else if (event === "done") {
    session = payload.session;
    $("step").textContent = session.step;
    $("status").textContent = `chunk ${session.step} in ${payload.total_s.toFixed(2)} s`;
  } else if (event === "error") fail(`${payload.status}: ${payload.error}`);
}

function next() {
  $("queued").textContent = pending.length;
  if (!busy && session && pending.length) step(pending.shift());
}

function press(key) {
  if (!session) { fail("start a session first"); return; }
  if (pending.length < 8) pending.push(key);
  next();
}

// playback at the service's frame rate, frames as they arrive
function play() {
  if (frames.length) {
    $("screen").src = "data:image/jpeg;base64," + frames.shift();
    shown += 1;
    $("frames").textContent = shown;
  }
}

async function download(ev) {
  ev.preventDefault();
  try {
    const blob = await (await api(`/v1/sessions/${session.session_id}/video`)).blob();
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob); a.download = "rollout.mp4"; a.click();
  } catch (err) { fail(err.message); }
}

async function init() {
  try {
    service = await (await fetch("/v1/config")).json();
  } catch (err) { fail("cannot reach the service: " + err.message); return; }
  // the keyboard drives the camera and the car; other modalities need action rows (the API)
  for (const m of service.modalities.filter((m) => m === "camera" || m === "driving")) {
    $("modality").add(new Option(m, m));
  }
  $("start").onclick = start;
  $("start").disabled = false;  // enabled only once the service's configuration is known
  $("download").onclick = download;
  document.querySelectorAll("button[data-key]").forEach((b) => { b.onclick = () => press(b.dataset.key); });
  document.addEventListener("keydown", (ev) => {
    if (ev.target.tagName === "INPUT") return;
    const key = KEYS[ev.key] || KEYS[ev.key.toLowerCase()];
    if (key) { ev.preventDefault(); press(key); }
  });
  setInterval(play, 1000 / service.fps);
}

init();
