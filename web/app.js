// Viewer page: join a room, one tile per sender, drag to orbit each sender's camera.
//
// Protocol (see telepresence/stream/messages.py): the page joins over the /ws socket,
// offers to every sender in the room (recvonly video + an unordered,
// no-retransmit "pose" data channel, ICE gathered before sending: aiortc does
// not trickle), and sends {type: "pose", seq, t, yaw, pitch, dist} at most once
// per animation frame plus {type: "ping", t} once a second, with {type: "stamps",
// on: true} beside it while the stats panel is open (stats.js, latency.js). No build step.
//
// Calls outlive the signaling socket (media flows peer to peer): when the socket
// drops, or the receiver restarts, the page rejoins with the `resume` token of its
// last `joined`, keeps its id, and keeps every live call.

import { TileStats } from "./stats.js";

const params = new URLSearchParams(location.search);
const ROOM = params.get("room") || "demo";
const TOKEN = params.get("token") || null;
const SIGNALING_URL = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;

const HEARTBEAT_MS = 1000;         // ping period on the pose channel
const SENDER_SILENCE_MS = 5000;    // no message from a sender this long: reconnect to it
const ICE_GATHER_TIMEOUT_MS = 4000;
const ANSWER_TIMEOUT_MS = 15000;
const OFFLINE_TILE_MS = 30000;     // a departed sender's tile waits this long for it to come back
const DEFAULT_LIMITS = { yaw: 40, pitch: 25, distMin: 0.6, distMax: 1.6 };

// What each sender status means is said by the sender itself (its `status` messages carry the text).

const $ = (selector, root = document) => root.querySelector(selector);
const clamp = (x, lo, hi) => Math.min(hi, Math.max(lo, x));

// ---------------------------------------------------------------------------------------------
// Orbit: one sender's camera request, driven by pointer, wheel, pinch and keys.

class Orbit {
  constructor(element, onChange) {
    this.limits = { ...DEFAULT_LIMITS };
    this.yaw = 0; this.pitch = 0; this.dist = 1;
    this.onChange = onChange;
    this.pointers = new Map();
    this.animation = null;
    element.addEventListener("pointerdown", (e) => this.pointerDown(e, element));
    element.addEventListener("pointermove", (e) => this.pointerMove(e, element));
    for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) {
      element.addEventListener(type, (e) => this.pointerUp(e, element));
    }
    element.addEventListener("wheel", (e) => {
      e.preventDefault();
      const lines = e.deltaMode === 1 ? 16 : e.deltaMode === 2 ? 400 : 1;
      this.zoomBy(Math.exp(e.deltaY * lines * 0.0015));
    }, { passive: false });
    element.addEventListener("dblclick", (e) => { e.preventDefault(); this.reset(); });
  }

  setLimits(limits) {
    this.limits = { ...DEFAULT_LIMITS, ...limits };
    this.set(this.yaw, this.pitch, this.dist);
  }

  set(yaw, pitch, dist) {
    const l = this.limits;
    this.yaw = clamp(yaw, -l.yaw, l.yaw);
    this.pitch = clamp(pitch, -l.pitch, l.pitch);
    this.dist = clamp(dist, l.distMin, l.distMax);
    this.onChange();
  }

  // Grab semantics: dragging right turns the head to the right, i.e. the camera
  // orbits to the left (yaw decreases); dragging down shows the head from above.
  rotateBy(dyaw, dpitch) { this.stopAnimation(); this.set(this.yaw + dyaw, this.pitch + dpitch, this.dist); }
  zoomBy(factor) { this.stopAnimation(); this.set(this.yaw, this.pitch, this.dist * factor); }

  reset() {
    this.stopAnimation();
    const from = { yaw: this.yaw, pitch: this.pitch, dist: this.dist };
    const start = performance.now();
    const step = (now) => {
      const t = Math.min(1, (now - start) / 280);
      const k = 1 - Math.pow(1 - t, 3);  // ease-out cubic
      this.set(from.yaw * (1 - k), from.pitch * (1 - k), from.dist + (1 - from.dist) * k);
      this.animation = t < 1 ? requestAnimationFrame(step) : null;
    };
    this.animation = requestAnimationFrame(step);
  }

  stopAnimation() {
    if (this.animation !== null) { cancelAnimationFrame(this.animation); this.animation = null; }
  }

  pointerDown(e, element) {
    if (e.pointerType === "mouse" && e.button !== 0) return;
    element.setPointerCapture?.(e.pointerId);
    this.pointers.set(e.pointerId, { x: e.clientX, y: e.clientY });
    element.classList.add("dragging");
    element.focus({ preventScroll: true });
  }

  pointerMove(e, element) {
    const prev = this.pointers.get(e.pointerId);
    if (!prev) return;
    const point = { x: e.clientX, y: e.clientY };
    if (this.pointers.size === 1) {
      const degPerPx = 2 * this.limits.yaw / Math.max(200, element.clientWidth);  // full width = full yaw range
      this.rotateBy(-(point.x - prev.x) * degPerPx, (point.y - prev.y) * degPerPx);
    } else if (this.pointers.size === 2) {
      const [a, b] = [...this.pointers.entries()].map(([id, p]) => (id === e.pointerId ? point : p));
      const [pa, pb] = [...this.pointers.values()];
      const before = Math.hypot(pa.x - pb.x, pa.y - pb.y);
      const after = Math.hypot(a.x - b.x, a.y - b.y);
      if (before > 0 && after > 0) this.zoomBy(before / after);  // fingers apart: closer camera
    }
    this.pointers.set(e.pointerId, point);
  }

  pointerUp(e, element) {
    this.pointers.delete(e.pointerId);
    if (this.pointers.size === 0) element.classList.remove("dragging");
  }

  handleKey(e) {
    const step = e.shiftKey ? 10 : 4;
    switch (e.key) {
      case "ArrowLeft": this.rotateBy(step, 0); break;   // as if dragging left
      case "ArrowRight": this.rotateBy(-step, 0); break;
      case "ArrowUp": this.rotateBy(0, -step); break;
      case "ArrowDown": this.rotateBy(0, step); break;
      case "+": case "=": this.zoomBy(1 / 1.1); break;
      case "-": case "_": this.zoomBy(1.1); break;
      case "0": case "Home": this.reset(); break;
      default: return false;
    }
    return true;
  }
}

// ---------------------------------------------------------------------------------------------
// Tile: one sender: its peer connection, pose channel, video, status and stats.

class Tile {
  constructor(app, peer) {
    this.app = app;
    this.senderId = peer.id;
    this.name = peer.name || "sender";
    this.element = $("#tile-template").content.firstElementChild.cloneNode(true);
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
    this.offlineTimer = setTimeout(() => this.app.removeTile(this), OFFLINE_TILE_MS);
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
    const o = this.orbit;
    this.send({ type: "pose", seq: ++this.seq, t: performance.now(), yaw: o.yaw, pitch: o.pitch, dist: o.dist });
  }

  renderPose() {
    const o = this.orbit;
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

function waitForIceGathering(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { pc.removeEventListener("icegatheringstatechange", check); clearTimeout(timer); resolve(); };
    const check = () => { if (pc.iceGatheringState === "complete") done(); };
    const timer = setTimeout(done, timeoutMs);
    pc.addEventListener("icegatheringstatechange", check);
  });
}

// ---------------------------------------------------------------------------------------------
// Signaling: the /ws socket, rejoining on its own with backoff.

class Signaling {
  constructor(app) {
    this.app = app;
    this.ws = null;
    this.backoffMs = 500;
    this.stopped = false;
    this.resume = null;  // the last `joined`'s token: rejoin under the same id
  }

  connect() {
    const ws = new WebSocket(SIGNALING_URL);
    this.ws = ws;
    ws.onopen = () => {
      const join = { type: "join", room: ROOM, role: "viewer", name: navigator.userAgent.includes("Firefox") ? "Firefox" : "Browser" };
      if (TOKEN) join.token = TOKEN;
      if (this.resume) join.resume = this.resume;
      ws.send(JSON.stringify(join));
    };
    ws.onmessage = (e) => {
      let message;
      try { message = JSON.parse(e.data); } catch { return; }
      this.app.onSignalingMessage(message);
    };
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.app.onSignalingLost();
      if (this.stopped) return;
      setTimeout(() => this.connect(), this.backoffMs);
      this.backoffMs = Math.min(this.backoffMs * 2, 5000);
    };
  }

  joined(resume) { this.backoffMs = 500; if (typeof resume === "string") this.resume = resume; }

  stop() { this.stopped = true; this.ws?.close(); }

  send(message) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(message));
  }
}

// ---------------------------------------------------------------------------------------------
// App: the room, its tiles, the global status line.

class App {
  constructor() {
    this.tiles = new Map();           // sender id -> Tile
    this.roomSenders = new Set();     // sender ids in the room, as the server last said
    this.activeTile = null;
    this.iceServers = [];
    this.joined = false;
    this.fatal = null;
    this.statsOpen = false;           // the stats panel; closed: each tile shows its badge only
    this.stage = $("#stage");
    this.signaling = new Signaling(this);
    $("#room-name").textContent = ROOM;
    document.title = `${ROOM} · Portrait telepresence`;
    this.bindGlobalControls();
    this.refreshConnection();
    this.signaling.connect();
    const frame = () => { for (const tile of this.tiles.values()) tile.flushPose(); requestAnimationFrame(frame); };
    requestAnimationFrame(frame);
  }

  bindGlobalControls() {
    $("#stats-toggle").addEventListener("click", () => this.setStatsOpen(!this.statsOpen));
    window.addEventListener("keydown", (e) => {
      if (e.target instanceof HTMLInputElement || e.metaKey || e.ctrlKey || e.altKey) return;
      if (e.key === "s" || e.key === "S") { this.setStatsOpen(!this.statsOpen); return; }
      const tile = this.activeTile && this.tiles.has(this.activeTile.senderId) ? this.activeTile : this.tiles.values().next().value;
      if (tile && tile.orbit.handleKey(e)) e.preventDefault();
    });
  }

  // The stats panel beside the stage; while it is open each sender stamps its frames for this page.
  setStatsOpen(open) {
    this.statsOpen = open;
    document.body.classList.toggle("stats-open", open);
    $("#stats-toggle").setAttribute("aria-pressed", String(open));
    for (const tile of this.tiles.values()) {
      tile.stats.setOpen(open);
      const stamps = tile.stats.stampsMessage();
      if (stamps) tile.send(stamps);
    }
  }

  onSignalingMessage(message) {
    switch (message.type) {
      case "joined": {
        this.joined = true;
        this.signaling.joined(message.resume);
        this.iceServers = Array.isArray(message.iceServers) ? message.iceServers : [];
        const peers = (message.peers || []).filter((peer) => peer.role === "sender");
        this.roomSenders = new Set(peers.map((peer) => peer.id));
        // A live call whose sender has not rejoined yet goes on (it may be rejoining too); a tile
        // without a call and without its sender waits for it, offline.
        for (const tile of [...this.tiles.values()]) {
          if (!this.roomSenders.has(tile.senderId) && !tile.inCall && tile.state !== "offline") tile.senderLeft();
        }
        for (const peer of peers) this.addSender(peer);
        break;
      }
      case "peer-joined":
        if (message.peer?.role === "sender") {
          this.roomSenders.add(message.peer.id);
          this.addSender(message.peer);
        }
        break;
      case "peer-left": {
        this.roomSenders.delete(message.id);
        const tile = this.tiles.get(message.id);
        if (tile) tile.senderLeft();
        break;
      }
      case "answer": this.tiles.get(message.from)?.onAnswer(message.sdp); break;
      case "decline": this.tiles.get(message.from)?.onDecline(message.reason || "no reason given"); break;
      case "error":
        if (message.code === "bad-token") {
          this.fatal = TOKEN ? "Wrong room token." : "This room needs a token: open the URL the receiver printed (…?token=…).";
          this.signaling.stop();
        } else if (["room-full", "too-many-connections", "address-limit"].includes(message.code)) {
          this.fatal = `Cannot join: ${message.message}.`;
          this.signaling.stop();
        } else {
          console.warn("signaling error:", message.code, message.message);
        }
        break;
    }
    this.refreshConnection();
  }

  onSignalingLost() {
    // Calls go on peer to peer; the page rejoins under the same id (Signaling.resume) and reconciles.
    this.joined = false;
    this.refreshConnection();
  }

  addSender(peer) {
    const known = this.tiles.get(peer.id);
    if (known) {  // the same sender (ids survive its reconnects): keep a live call, else call again
      if (known.state === "offline") known.senderReturned(peer);
      return;
    }
    // A sender that comes back under a new id and the same name keeps its tile (and the viewer's orbit).
    for (const tile of this.tiles.values()) {
      if (tile.name === peer.name && (tile.state === "offline" || !this.roomSenders.has(tile.senderId))) {
        this.tiles.delete(tile.senderId);
        this.tiles.set(peer.id, tile);
        tile.senderReturned(peer);
        return;
      }
    }
    const tile = new Tile(this, peer);
    this.tiles.set(peer.id, tile);
    this.stage.appendChild(tile.element);
    this.layout();
    tile.connect();
  }

  removeTile(tile) {
    if (this.tiles.get(tile.senderId) === tile) this.tiles.delete(tile.senderId);
    tile.destroy();
    if (this.activeTile === tile) this.activeTile = null;
    this.layout();
    this.refreshConnection();
  }

  layout() {
    this.stage.dataset.count = String(Math.min(this.tiles.size, 4));
  }

  refreshConnection() {
    const el = $("#connection");
    const text = $("#connection-text");
    const title = $("#empty-title");
    const detail = $("#empty-detail");
    let state, label;
    if (this.fatal) {
      state = "error"; label = "Not connected";
      title.textContent = this.fatal; detail.textContent = "";
    } else if (!this.joined) {
      const first = this.signaling.backoffMs === 500 && !this.everJoined;
      state = first ? "connecting" : "reconnecting";
      label = first ? "Connecting…" : "Reconnecting…";
      title.textContent = first ? "Connecting to the server…" : "Lost the server — reconnecting…";
      detail.textContent = "";
    } else {
      this.everJoined = true;
      const tiles = [...this.tiles.values()];
      const live = tiles.filter((t) => t.state === "live" || t.state === "degraded").length;
      if (tiles.length > 0 && tiles.every((t) => t.state === "offline")) {
        state = "waiting"; label = "Sender left — waiting";
      } else if (tiles.length === 0) {
        state = "waiting"; label = "Waiting for a sender";
        title.textContent = `Waiting for a sender in room “${ROOM}”…`;
        detail.textContent = `Start one with: python run_sender.py --room ${ROOM}`;
      } else if (live === tiles.length) {
        state = "live"; label = tiles.length === 1 ? "Live" : `Live · ${tiles.length} people`;
      } else if (tiles.some((t) => t.state === "reconnecting")) {
        state = "reconnecting"; label = "Reconnecting…";
      } else {
        state = "connecting"; label = live ? `Live · ${live} of ${tiles.length}` : "Connecting…";
      }
    }
    el.dataset.state = state;
    text.textContent = label;
    document.body.classList.toggle("has-tiles", this.tiles.size > 0);
  }
}

window.telepresence = new App();
