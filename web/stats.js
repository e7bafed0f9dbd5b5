// One sender's numbers: the small badge on its tile (fps, glass to glass, refiner on/off) and its
// section of the stats panel (this browser's WebRTC stats, the sender's once-a-second `stats`, the
// picture size and why). Glass to glass is measured from the frames while the panel is open
// (latency.js: the sender stamps this viewer's frames only then) and estimated, labelled "≈",
// from its measured parts while it is closed.

import { ClockOffset, LatencyMeter, pageClockMs } from "./latency.js";

const STAMPS_OFF_REPEATS = 3;  // "stamps off" rides on this many pings: the channel may lose one
const MEMORY_NOTE_MS = 4000;   // how long a refused memory reset is said under the memory row

// A sender's section of the stats panel, the same on every page.
const SECTION = document.createElement("template");
SECTION.innerHTML = `
<section class="tile-stats" data-state="connecting">
  <h2 class="tile-stats-name">sender</h2>
  <dl class="stats">
    <dt>glass to glass</dt><dd><span data-stat="latency">–</span> ms</dd>
    <dt>estimate</dt><dd>≈ <span data-stat="latency-estimate">–</span> ms</dd>
    <dt class="section">received</dt><dd class="section"><span data-stat="fps">–</span> fps</dd>
    <dt>round trip</dt><dd><span data-stat="rtt">–</span> ms</dd>
    <dt>bitrate</dt><dd><span data-stat="bitrate">–</span> kbps</dd>
    <dt>jitter buffer</dt><dd><span data-stat="jitter">–</span> ms</dd>
    <dt>decode</dt><dd><span data-stat="decode">–</span> ms</dd>
    <dt>dropped</dt><dd><span data-stat="dropped">–</span> frames</dd>
    <dt>video</dt><dd><span data-stat="video">–</span></dd>
    <dt>clock offset</dt><dd><span data-stat="offset">–</span> ms</dd>
    <dt class="section">sender</dt><dd class="section"><span data-stat="sender-fps">–</span> fps</dd>
    <dt>refiner</dt><dd><span data-stat="refiner">–</span></dd>
    <dt class="kernels-row" hidden>GPU kernels</dt><dd class="kernels-row" hidden><span data-stat="kernels">–</span></dd>
    <dt>capture</dt><dd><span data-stage="capture">–</span> ms</dd>
    <dt>landmarks</dt><dd><span data-stage="landmarks">–</span> ms</dd>
    <dt>avatar</dt><dd><span data-stage="avatar">–</span> ms</dd>
    <dt>render</dt><dd><span data-stage="render">–</span> ms</dd>
    <dt>refine</dt><dd><span data-stage="refine">–</span> ms</dd>
    <dt>to encoder</dt><dd><span data-stat="capture-to-encoder">–</span> ms</dd>
    <dt>encode</dt><dd><span data-stage="encode">–</span> ms</dd>
    <dt class="section memory-row" hidden>memory</dt><dd class="section memory-row" hidden><span data-stat="memory">–</span> % <button class="memory-reset" type="button" title="Forget what the sender's appearance memory has seen of this person (the sides of the head are invented again until the camera sees them)">reset</button></dd>
  </dl>
  <p class="stats-note memory-note" role="status" aria-live="polite"></p>
  <p class="stats-note" data-stat="size-why"></p>
</section>`;

const KERNELS_TEXT = {
  compiling: "compiling (2-6 minutes the first time on the sender's machine; frames may come slower until done)",
  compiled: "compiled",
  failed: "not compiled: the compile failed (the sender's log says why)",
  off: "not compiled (--compile-avatar off)",
};

const fmt = (x, digits = 0) => (x === null || x === undefined || !Number.isFinite(x) ? "–" : x.toFixed(digits));

const LATENCY_TITLES = {
  measured: "Glass to glass, measured: from the sender's capture time, painted into the corner of this "
    + "viewer's frames while the statistics are open, to the frame's display on this page (the sender's "
    + "clock offset comes from ping/pong). Median of the last 1.5 s.",
  estimated: "Glass to glass, estimated (≈): the sum of measured parts: sender capture → encoder and encode "
    + "(the sender's stats), half the round trip, jitter buffer and decode (this browser's WebRTC stats). "
    + "Open the statistics (S) to measure it from the frames themselves.",
  none: "Glass to glass: no figure yet.",
};

const SIZE_TITLE = "The sender picks 512 px on a CUDA GPU and 256 px on the CPU (4x fewer pixels to compute) "
  + "unless started with --size; this page scales the picture to the tile.";

// What picture the sender sends and why, from its hello {size, device}: [short, sentence].
export function sizeNote(hello) {
  if (!Number.isFinite(hello?.size)) return ["", ""];
  const size = `${hello.size} px`;
  switch (hello.device) {
    case "cpu": return [`${size} · CPU`, `${size}: the sender runs on the CPU`];
    case "cuda": return [`${size} · GPU`, `${size}: the sender runs on a CUDA GPU`];
    case undefined: case null: return [size, `${size} sent`];
    default: return [`${size} · ${hello.device}`, `${size}: the sender runs on ${hello.device}`];
  }
}

export class TileStats {
  constructor(tileElement, video, panel) {
    this.tile = tileElement;
    this.section = SECTION.content.firstElementChild.cloneNode(true);
    panel.appendChild(this.section);
    this.badge = tileElement.querySelector(".badge");
    this.clock = new ClockOffset();
    this.meter = new LatencyMeter(video, this.clock);
    this.open = false;
    this.stampsOffLeft = 0;
    this.prev = null;         // the previous getStats sample, for rates
    this.pingRttMs = null;
    this.sender = null;       // the sender's last `stats` message
    this.estimateMs = null;
    this.memoryNoteTimer = null;
  }

  setName(name) { this.section.querySelector(".tile-stats-name").textContent = name; }

  setState(state) { this.section.dataset.state = state; }

  setHello(hello) {
    const on = typeof hello.refiner === "string" && hello.refiner.length > 0;
    const refiner = this.badge.querySelector('[data-badge="refiner"]');
    refiner.textContent = on ? "refiner on" : "refiner off";
    refiner.dataset.on = String(on);
    refiner.title = on ? `Refiner: ${hello.refiner}` : "No refiner: raw avatar renders";
    this.set("refiner", on ? hello.refiner : "off (raw avatar)");
    const [short, sentence] = sizeNote(hello);
    const plate = this.tile.querySelector(".size-note");
    plate.textContent = short;
    plate.title = SIZE_TITLE;
    this.set("size-why", sentence);
    this.section.querySelector('[data-stat="size-why"]').title = SIZE_TITLE;
  }

  onPong(message) {
    const now = performance.now();
    if (!Number.isFinite(message.t)) return;
    this.pingRttMs = now - message.t;
    if (Number.isFinite(message.wall_ms)) this.clock.add(pageClockMs(message.t), pageClockMs(now), message.wall_ms);
  }

  onSenderStats(message) {
    this.sender = message;
    this.set("sender-fps", fmt(message.fps, 1));
    this.set("capture-to-encoder", fmt(message.capture_to_encoder_ms, 1));
    const stages = message.stages_ms || {};
    for (const el of this.section.querySelectorAll("[data-stage]")) el.textContent = fmt(stages[el.dataset.stage], 1);
    this.renderMemory(message.memory);
    this.renderKernels(message.kernels);
  }

  // The sender's GPU kernels (its avatar's torch.compile): a note on the badge while they compile, since frames
  // cost more until then (and come slower on a busy sender); a row in the panel. Absent: a CPU sender.
  renderKernels(state) {
    const known = typeof state === "string" && state !== "";
    for (const el of this.section.querySelectorAll(".kernels-row")) el.hidden = !known;
    this.set("kernels", known ? (KERNELS_TEXT[state] || state) : "–");
    this.badge.querySelector('[data-badge="compiling"]').hidden = state !== "compiling";
  }

  // The sender's appearance memory: how much of the head it holds (0..1), or off (null / absent).
  renderMemory(fill) {
    const on = Number.isFinite(fill);
    const percent = on ? fmt(100 * fill) : "–";
    for (const el of this.section.querySelectorAll(".memory-row")) el.hidden = !on;
    this.set("memory", percent);
    const badge = this.badge.querySelector('[data-badge="memory"]');
    badge.hidden = !on;
    badge.querySelector("b").textContent = percent;
  }

  // The stats panel opened or closed: the sender stamps this viewer's frames only while it is open.
  setOpen(open) {
    this.open = open;
    if (open) this.meter.start();
    else { this.meter.stop(); this.stampsOffLeft = STAMPS_OFF_REPEATS; }
    this.badge.setAttribute("aria-expanded", String(open));
    this.renderLatency();
  }

  // What to send on the pose channel with this ping (null: nothing).
  stampsMessage() {
    if (this.open) return { type: "stamps", on: true };
    if (this.stampsOffLeft > 0) { this.stampsOffLeft--; return { type: "stamps", on: false }; }
    return null;
  }

  // A call ended: its numbers, clock samples and stamps are gone.
  reset() {
    this.prev = null;
    this.pingRttMs = null;
    this.sender = null;
    this.estimateMs = null;
    this.clock.clear();
    this.meter.clear();
    this.stampsOffLeft = 0;
    for (const el of [...this.section.querySelectorAll("[data-stat], [data-stage]"), ...this.badge.querySelectorAll("b[data-badge]")]) {
      if (el.dataset.stat !== "size-why" && el.dataset.stat !== "refiner") el.textContent = "–";  // no stale numbers
    }
    this.renderMemory(null);
    this.sayMemoryNote("");
  }

  // fn(): called when the reset button of the memory row is pressed (the tile sends reset_memory).
  onResetMemory(fn) { this.section.querySelector(".memory-reset").addEventListener("click", fn); }

  // `text` under the memory row for MEMORY_NOTE_MS (the sender refused a reset: see the tile's `error`); "" clears it.
  sayMemoryNote(text) {
    clearTimeout(this.memoryNoteTimer);
    const note = this.section.querySelector(".memory-note");
    note.textContent = text;
    this.memoryNoteTimer = text ? setTimeout(() => { note.textContent = ""; }, MEMORY_NOTE_MS) : null;
  }

  remove() {
    this.meter.stop();
    this.section.remove();
  }

  set(key, text) { this.section.querySelector(`[data-stat="${key}"]`).textContent = text; }

  // Once a second: this browser's view of the call, and the latency figures.
  async update(pc) {
    let report;
    try { report = await pc.getStats(); } catch { return; }
    let inbound = null, pair = null, selectedPairId = null;
    report.forEach((s) => {
      if (s.type === "inbound-rtp" && (s.kind === "video" || s.mediaType === "video")) inbound = s;
      else if (s.type === "transport" && s.selectedCandidatePairId) selectedPairId = s.selectedCandidatePairId;
    });
    report.forEach((s) => {
      if (s.type !== "candidate-pair") return;
      if (s.id === selectedPairId || s.selected || (!selectedPairId && s.nominated && s.state === "succeeded")) pair = s;
    });
    const now = performance.now();
    const prev = this.prev;
    const value = {};
    if (inbound) {
      const dt = prev ? (now - prev.at) / 1000 : 0;
      value.fps = inbound.framesPerSecond ?? (prev && dt > 0 ? (inbound.framesDecoded - prev.framesDecoded) / dt : null);
      value.bitrate = prev && dt > 0 ? (8 * (inbound.bytesReceived - prev.bytesReceived)) / dt / 1000 : null;
      const emitted = inbound.jitterBufferEmittedCount - (prev?.emitted ?? 0);
      value.jitter = emitted > 0 ? (1000 * (inbound.jitterBufferDelay - (prev?.jitterDelay ?? 0))) / emitted : null;
      const decoded = (inbound.framesDecoded ?? 0) - (prev?.framesDecoded ?? 0);
      value.decode = decoded > 0 && Number.isFinite(inbound.totalDecodeTime)
        ? (1000 * (inbound.totalDecodeTime - (prev?.decodeTime ?? 0))) / decoded : null;
      value.dropped = inbound.framesDropped ?? null;
      const codec = inbound.codecId ? report.get(inbound.codecId) : null;
      const size = inbound.frameWidth ? `${inbound.frameWidth}²` : "";
      value.video = [codec?.mimeType?.replace("video/", ""), size].filter(Boolean).join(" ") || null;
      this.prev = {
        at: now, framesDecoded: inbound.framesDecoded ?? 0, bytesReceived: inbound.bytesReceived ?? 0,
        emitted: inbound.jitterBufferEmittedCount ?? 0, jitterDelay: inbound.jitterBufferDelay ?? 0,
        decodeTime: inbound.totalDecodeTime ?? 0,
      };
    }
    const rttS = pair?.currentRoundTripTime;
    value.rtt = Number.isFinite(rttS) ? rttS * 1000 : this.pingRttMs;
    // sender capture -> encoder, + encode, + network (half the round trip), + jitter buffer, + decode
    const toEncoder = this.sender?.capture_to_encoder_ms;
    this.estimateMs = Number.isFinite(toEncoder) && Number.isFinite(value.rtt)
      ? toEncoder + (this.sender.stages_ms?.encode ?? 0) + value.rtt / 2 + (value.jitter ?? 0) + (value.decode ?? 0)
      : null;
    this.set("fps", fmt(value.fps, 1));
    this.set("rtt", fmt(value.rtt, 1));
    this.set("bitrate", fmt(value.bitrate));
    this.set("jitter", fmt(value.jitter));
    this.set("decode", fmt(value.decode, 1));
    this.set("dropped", fmt(value.dropped));
    this.set("video", value.video || "–");
    this.set("offset", fmt(this.clock.offsetMs, 1));
    this.badge.querySelector('[data-badge="fps"]').textContent = fmt(value.fps, 0);
    this.renderLatency();
  }

  renderLatency() {
    const measured = this.open ? this.meter.medianMs : null;
    const estimate = this.estimateMs;
    this.set("latency", fmt(measured));
    this.set("latency-estimate", fmt(estimate));
    const badge = this.badge.querySelector('[data-badge="latency"]');
    const kind = measured !== null ? "measured" : estimate !== null ? "estimated" : "none";
    badge.textContent = kind === "measured" ? fmt(measured) : kind === "estimated" ? `≈${fmt(estimate)}` : "–";
    badge.parentElement.dataset.kind = kind;
    badge.parentElement.title = LATENCY_TITLES[kind];
  }
}
