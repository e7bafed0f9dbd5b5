// Tile: one sender seen by this page: its peer connection, pose channel, video, status, and its
// numbers (stats.js: the badge on the tile, its section of the stats panel).
// Both pages have tiles (app.js: the viewer; call.js: the call); the room they belong to
// (room.js) gives them iceServers, signaling, joined, roomSenders, activeTile, poseOffset,
// statsOpen, setStatsOpen(open), removeTile(tile) and refreshConnection().
//
// Protocol (see telepresence/stream/messages.py): the page offers to the sender (recvonly
// video + an unordered, no-retransmit "pose" data channel, ICE gathered before sending: aiortc
// does not trickle), and sends {type: "pose", seq, t, yaw, pitch, dist} at most once per
// animation frame plus {type: "ping", t} once a second, with {type: "stamps", on} beside it
// while the stats panel is open (the sender then paints capture times into this page's frames),
// and {type: "reset_memory"} when the memory row's reset button is pressed.

import { Orbit, clamp } from "./orbit.js";
import { TileStats } from "./stats.js";

const HEARTBEAT_MS = 1000;         // ping period on the pose channel
const SENDER_SILENCE_MS = 5000;    // no message from a sender this long: reconnect to it
const ICE_GATHER_TIMEOUT_MS = 4000;
const ANSWER_TIMEOUT_MS = 15000;
const OFFLINE_TILE_MS = 30000;     // a departed sender's tile waits this long for it to come back

// What each sender status means is said by the sender itself (its `status` messages carry the text).

export const $ = (selector, root = document) => root.querySelector(selector);

// A tile's markup, the same on every page.
const TILE = document.createElement("template");
TILE.innerHTML = `
<section class="tile" tabindex="0" data-state="connecting" aria-label="Remote participant">
  <video class="video" autoplay muted playsinline disablepictureinpicture></video>
  <div class="shade" aria-hidden="true"></div>
  <div class="stamp-veil" aria-hidden="true"></div>
  <div class="banner" role="status" aria-live="polite"><span class="spinner small" aria-hidden="true"></span><span class="banner-text">Connecting…</span></div>
  <button class="badge" type="button" aria-expanded="false" aria-controls="stats-panel" title="Statistics (S)">
    <span class="badge-fps"><b data-badge="fps">–</b> fps</span>
    <span class="badge-latency" data-kind="none"><b data-badge="latency">–</b> ms</span>
    <span data-badge="refiner">refiner –</span>
    <span data-badge="compiling" hidden title="The sender is compiling its GPU kernels (2-6 minutes the first time on its machine, the longer the more viewer counts it serves): until it is done its frames cost more, and may come slower">compiling</span>
    <span data-badge="memory" hidden title="What the sender's appearance memory holds of the head: the sides seen earlier in the call">memory <b>–</b>%</span>
  </button>
  <div class="nameplate"><span class="live-dot" aria-hidden="true"></span><span class="name">sender</span><span class="size-note"></span></div>
  <div class="pose" aria-hidden="true">
    <div class="pose-pad"><div class="pose-dot"></div></div>
    <div class="pose-text"><span data-pose="yaw">0°</span> <span data-pose="pitch">0°</span> <span data-pose="zoom">100%</span></div>
  </div>
</section>`;

export class Tile {
  constructor(app, peer) {
    this.app = app;
    this.senderId = peer.id;
    this.name = peer.name || "sender";
    this.element = TILE.content.firstElementChild.cloneNode(true);
    this.video = $("video", this.element);
    this.bannerText = $(".banner-text", this.element);
    $(".name", this.element).textContent = this.name;
    this.element.setAttribute("aria-label", `Remote participant ${this.name}`);
    this.orbit = new Orbit(this.element, () => { this.poseDirty = true; this.renderPose(); });
    this.element.addEventListener("pointerenter", () => { app.activeTile = this; });
    this.element.addEventListener("focus", () => { app.activeTile = this; });
    this.video.addEventListener("playing", () => this.onVideoPlaying());
    this.stats = new TileStats(this.element, this.video, $("#stats-panel"));
    this.stats.setName(this.name);
    this.stats.setOpen(app.statsOpen);
    this.stats.onResetMemory(() => this.send({ type: "reset_memory" }));
    const badge = $(".badge", this.element);
    for (const type of ["pointerdown", "dblclick"]) badge.addEventListener(type, (e) => e.stopPropagation());  // no orbit
    badge.addEventListener("click", () => app.setStatsOpen(!app.statsOpen));
    this.pc = null;
    this.channel = null;
    this.seq = 0;
    this.poseDirty = true;
    this.senderStatus = null;
    this.statusTexts = {};  // status -> the text the sender sent with it
    this.lastMessageAt = 0;
    this.timers = [];
    this.retryTimer = null;
    this.offlineTimer = null;
    this.generation = 0;
    this.renderPose();
  }

  // -- connection lifecycle --

  async connect() {
    this.teardown();
    const generation = ++this.generation;
    this.setState("connecting", `Connecting to ${this.name}…`);
    const pc = new RTCPeerConnection({ iceServers: this.app.iceServers });
    this.pc = pc;
    pc.addTransceiver("video", { direction: "recvonly" });
    const channel = pc.createDataChannel("pose", { ordered: false, maxRetransmits: 0 });
    this.channel = channel;
    channel.onopen = () => this.onChannelOpen();
    channel.onmessage = (e) => this.onChannelMessage(e.data);
    channel.onclose = () => { if (generation === this.generation) this.scheduleReconnect("The connection closed"); };
    pc.ontrack = (e) => {
      if ("jitterBufferTarget" in e.receiver) e.receiver.jitterBufferTarget = 0;  // lowest delay (Chrome)
      else if ("playoutDelayHint" in e.receiver) e.receiver.playoutDelayHint = 0;
      this.video.srcObject = e.streams[0] || new MediaStream([e.track]);
      this.video.play().catch(() => {});
    };
    pc.onconnectionstatechange = () => {
      if (generation !== this.generation) return;
      if (pc.connectionState === "failed") this.scheduleReconnect("The connection failed");
    };
    try {
      await pc.setLocalDescription(await pc.createOffer());
      await waitForIceGathering(pc, ICE_GATHER_TIMEOUT_MS);
      if (generation !== this.generation) return;
      this.app.signaling.send({ type: "offer", to: this.senderId, sdp: pc.localDescription.sdp });
      this.timers.push(setTimeout(() => {
        if (generation === this.generation && !pc.remoteDescription) this.scheduleReconnect("No answer from the sender");
      }, ANSWER_TIMEOUT_MS));
    } catch (error) {
      console.warn("offer failed", error);
      this.scheduleReconnect("Could not create the connection");
    }
  }

  async onAnswer(sdp) {
    if (!this.pc || this.pc.signalingState !== "have-local-offer") return;
    try {
      await this.pc.setRemoteDescription({ type: "answer", sdp });
      this.setState("waiting-video", `Waiting for video from ${this.name}…`);
    } catch (error) {
      console.warn("answer rejected", error);
      this.scheduleReconnect("The sender's answer was not accepted");
    }
  }

  onDecline(reason) {
    this.scheduleReconnect(`The sender declined: ${reason}`, 5000);
  }

  onChannelOpen() {
    this.lastMessageAt = performance.now();
    this.poseDirty = true;
    const ping = () => {
      this.send({ type: "ping", t: performance.now() });
      const stamps = this.stats.stampsMessage();  // repeated with every ping: the channel may lose one
      if (stamps) this.send(stamps);
    };
    ping();
    this.timers.push(setInterval(() => {
      ping();
      if (performance.now() - this.lastMessageAt > SENDER_SILENCE_MS) this.scheduleReconnect("The sender stopped answering");
    }, HEARTBEAT_MS));
    this.timers.push(setInterval(() => { if (this.pc) this.stats.update(this.pc); }, 1000));
  }

  onChannelMessage(data) {
    this.lastMessageAt = performance.now();
    let message;
    try { message = JSON.parse(data); } catch { return; }
    switch (message.type) {
      case "hello":
        if (message.limits) this.orbit.setLimits(message.limits);
        if (message.name) { this.name = message.name; $(".name", this.element).textContent = message.name; this.stats.setName(message.name); }
        this.stats.setHello(message);
        break;
      case "pong":
        this.stats.onPong(message);
        break;
      case "status":
        if (typeof message.message === "string") this.statusTexts[message.status] = message.message;
        this.setSenderStatus(message.status);
        break;
      case "stats":
        this.setSenderStatus(message.status);
        this.stats.onSenderStats(message);
        break;
      case "error":
        console.warn("sender rejected a message:", message.code, message.message);
        // the pose channel's one limited request is reset_memory (at most once in 5 s, whoever asks: sender.py)
        if (message.code === "rate-limited") this.stats.sayMemoryNote("Memory reset refused: wait a few seconds");
        break;
    }
  }

  scheduleReconnect(reason, delayMs = 1000) {
    if (this.retryTimer !== null || this.offlineTimer !== null) return;
    if (this.app.joined && !this.app.roomSenders.has(this.senderId)) { this.senderLeft(); return; }  // gone: wait for it
    this.teardown();
    this.setState("reconnecting", `${reason} — reconnecting…`);
    this.retryTimer = setTimeout(() => { this.retryTimer = null; this.connect(); }, delayMs);
  }

  senderLeft() {
    this.teardown();
    this.setState("offline", `${this.name} left — waiting for them to come back…`);
    this.offlineTimer = setTimeout(() => this.app.removeTile(this), this.app.offlineTileMs ?? OFFLINE_TILE_MS);
  }

  senderReturned(peer) {
    clearTimeout(this.offlineTimer);
    this.offlineTimer = null;
    this.senderId = peer.id;
    this.connect();
  }

  get inCall() { return this.state === "live" || this.state === "degraded" || this.state === "waiting-video"; }

  teardown() {
    this.generation++;
    for (const t of this.timers) { clearTimeout(t); clearInterval(t); }
    this.timers = [];
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    if (this.channel) { this.channel.onclose = null; this.channel.close(); this.channel = null; }
    if (this.pc) { this.pc.close(); this.pc = null; }
    this.stats.reset();
  }

  destroy() {
    clearTimeout(this.offlineTimer);
    this.teardown();
    this.video.srcObject = null;
    this.stats.remove();
    this.element.remove();
  }

  // -- pose --

  send(message) {
    if (this.channel && this.channel.readyState === "open") this.channel.send(JSON.stringify(message));
  }

  flushPose() {  // called once per animation frame
    if (!this.poseDirty || !this.channel || this.channel.readyState !== "open") return;
    this.poseDirty = false;
    const o = this.pose();
    this.send({ type: "pose", seq: ++this.seq, t: performance.now(), yaw: o.yaw, pitch: o.pitch, dist: o.dist });
  }

  // The camera asked of the sender: this page's orbit, plus the room's offset when it has one (the
  // call's head tracking, call.js), within the sender's limits.
  pose() {
    const o = this.orbit, offset = this.app.poseOffset, l = o.limits;
    if (!offset) return { yaw: o.yaw, pitch: o.pitch, dist: o.dist, limits: l };
    return {
      yaw: clamp(o.yaw + offset.yaw, -l.yaw, l.yaw),
      pitch: clamp(o.pitch + offset.pitch, -l.pitch, l.pitch),
      dist: clamp(o.dist * offset.dist, l.distMin, l.distMax),
      limits: l,
    };
  }

  renderPose() {
    const o = this.pose();
    $('[data-pose="yaw"]', this.element).textContent = `${o.yaw >= 0 ? "+" : ""}${o.yaw.toFixed(0)}°`;
    $('[data-pose="pitch"]', this.element).textContent = `${o.pitch >= 0 ? "+" : ""}${o.pitch.toFixed(0)}°`;
    $('[data-pose="zoom"]', this.element).textContent = `${Math.round(100 / o.dist)}%`;
    const dot = $(".pose-dot", this.element);
    dot.style.left = `${50 + 42 * o.yaw / Math.max(1, o.limits.yaw)}%`;
    dot.style.top = `${50 - 42 * o.pitch / Math.max(1, o.limits.pitch)}%`;
    this.element.classList.toggle("posed", Math.abs(o.yaw) > 0.5 || Math.abs(o.pitch) > 0.5 || Math.abs(o.dist - 1) > 0.01);
  }

  // -- status --

  setState(state, text) {
    this.state = state;
    this.element.dataset.state = state;
    this.stats.setState(state);
    this.bannerText.textContent = text;
    this.app.refreshConnection();
  }

  onVideoPlaying() {
    if (this.state === "waiting-video" || this.state === "connecting") {
      this.setState("live", "");
      this.setSenderStatus(this.senderStatus);
    }
  }

  setSenderStatus(status) {
    this.senderStatus = status;
    const text = this.statusTexts[status] || "";
    this.element.dataset.sender = status || "";
    if (this.state === "live" || this.state === "degraded") {
      if (text) this.setState("degraded", text);
      else if (this.state !== "live") this.setState("live", "");
    }
  }
}

export function waitForIceGathering(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { pc.removeEventListener("icegatheringstatechange", check); clearTimeout(timer); resolve(); };
    const check = () => { if (pc.iceGatheringState === "complete") done(); };
    const timer = setTimeout(done, timeoutMs);
    pc.addEventListener("icegatheringstatechange", check);
  });
}
