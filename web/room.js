// Room: one page's room: its signaling socket, one tile per sender in it, the global status line.
// The viewer page (app.js) and the call page (call.js) are rooms; a page subclasses Room for its
// texts (`texts`), the senders it shows (acceptsSender), its own keys (handleKey) and messages
// (onOtherMessage), and sets `poseOffset` to steer every tile (the call's head tracking).

import { Tile, $ } from "./tile.js";
import { Signaling, ROOM, TOKEN } from "./signaling.js";

export class Room {
  constructor() {
    this.texts = {
      title: "Portrait telepresence",
      waiting: "Waiting for a sender",
      waitingTitle: `Waiting for a sender in room “${ROOM}”…`,
      waitingDetail: `Start one with: .venv/bin/telepresence send --room ${ROOM}`,
      left: "Sender left — waiting",
    };
    this.poseOffset = null;           // {yaw, pitch, dist} added to every tile's orbit, or null
    this.tiles = new Map();           // sender id -> Tile
    this.roomSenders = new Set();     // sender ids in the room, as the server last said
    this.activeTile = null;
    this.iceServers = [];
    this.joined = false;
    this.fatal = null;
    this.statsOpen = false;           // the stats panel; closed: each tile shows its badge only
    this.stage = $("#stage");
    this.signaling = new Signaling(this);
    $("#room-name").textContent = ROOM;  // from the first paint: the call page starts the room only on join
  }

  // After the subclass's constructor: the page is ready to show the room and join it.
  start() {
    document.title = `${ROOM} · ${this.texts.title}`;
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
      if (this.handleKey(e)) { e.preventDefault(); return; }
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

  // -- what a page may change --

  joinName() { return navigator.userAgent.includes("Firefox") ? "Firefox" : "Browser"; }

  acceptsSender(peer) { return true; }  // eslint-disable-line no-unused-vars

  handleKey(e) { return false; }  // eslint-disable-line no-unused-vars

  onOtherMessage(message) {}  // eslint-disable-line no-unused-vars

  // Every tile asks its sender again (poseOffset changed).
  posesChanged() {
    for (const tile of this.tiles.values()) { tile.poseDirty = true; tile.renderPose(); }
  }

  // -- the room --

  onSignalingMessage(message) {
    switch (message.type) {
      case "joined": {
        this.joined = true;
        this.signaling.joined(message.resume);
        this.iceServers = Array.isArray(message.iceServers) ? message.iceServers : [];
        const peers = (message.peers || []).filter((peer) => peer.role === "sender" && this.acceptsSender(peer));
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
        if (message.peer?.role === "sender" && this.acceptsSender(message.peer)) {
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
        } else if (["room-full", "too-many-connections", "address-limit"].includes(message.code)
                   || (message.code === "bad-field" && !this.signaling.inRoom)) {  // the join itself: a bad room name
          this.fatal = `Cannot join: ${message.message}.`;
          this.signaling.stop();
        } else {
          console.warn("signaling error:", message.code, message.message);
        }
        break;
      default:
        this.onOtherMessage(message);
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
        state = "waiting"; label = this.texts.left;
      } else if (tiles.length === 0) {
        state = "waiting"; label = this.texts.waiting;
        title.textContent = this.texts.waitingTitle;
        detail.textContent = this.texts.waitingDetail;
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
