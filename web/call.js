// Call page (/call?room=R): share the camera with the server, see everyone else's avatar in 3D,
// head-tracked.
//
// Nothing starts before the click: then the camera opens, the page joins the room (a Room, as the
// viewer page does: one tile per sender, room.js) and offers its camera to the server with
// `publish` (one sendonly video track + the "uplink" data channel, unordered, no retransmits,
// pinged every second). The answer, `published {sdp, id}`, names this person's own avatar, which
// the page does not show. The server may send `camera-rate {fps}`: the most frames a second
// worth sending (its pipeline uses no more), set as the sender's maxFramerate. The server
// analyses the camera and sends `head {yaw, pitch, dist}`: the camera offset the participant's own head asks for, added to their orbit of every tile while head
// tracking is on (docs/call.md). The camera picture goes only to the server; the others receive
// renders of the avatar. Leaving sends `unpublish`, stops the camera and closes every connection.

import { Room } from "./room.js";
import { $, waitForIceGathering } from "./tile.js";
import { ROOM, params } from "./signaling.js";

const UPLINK_HEARTBEAT_MS = 1000;
const PUBLISH_TIMEOUT_MS = 60000;   // the server loads the avatar's pipeline before it answers
const ICE_GATHER_TIMEOUT_MS = 4000;
const TOAST_MS = 4000;
const LEFT_TILE_MS = 4000;          // a participant who left is shown as gone this long
const UPLINK_CODECS = ["video/VP8", "video/H264", "video/rtx"];  // what the server decodes
const CAMERA = { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 30, max: 30 } };

// ---------------------------------------------------------------------------------------------
// Uplink: this page's camera to the server.

class Uplink {
  constructor(call, stream) {
    this.call = call;
    this.stream = stream;
    this.pc = null;
    this.channel = null;
    this.timers = [];
  }

  async start() {
    const pc = new RTCPeerConnection({ iceServers: this.call.iceServers });
    this.pc = pc;
    const transceiver = pc.addTransceiver(this.stream.getVideoTracks()[0], { direction: "sendonly", streams: [this.stream] });
    const codecs = (RTCRtpSender.getCapabilities?.("video")?.codecs || []).filter((c) => UPLINK_CODECS.includes(c.mimeType));
    if (codecs.length && transceiver.setCodecPreferences) transceiver.setCodecPreferences(codecs);
    const channel = pc.createDataChannel("uplink", { ordered: false, maxRetransmits: 0 });
    this.channel = channel;
    channel.onopen = () => {
      const ping = () => this.send({ type: "ping", t: performance.now() });
      ping();
      this.timers.push(setInterval(ping, UPLINK_HEARTBEAT_MS));
    };
    channel.onmessage = (e) => {
      let message;
      try { message = JSON.parse(e.data); } catch { return; }
      this.call.onUplinkMessage(message);
    };
    pc.onconnectionstatechange = () => {
      if (pc.connectionState === "failed") this.call.endCall("The connection to the server failed.");
    };
    await pc.setLocalDescription(await pc.createOffer());
    await waitForIceGathering(pc, ICE_GATHER_TIMEOUT_MS);
    if (this.pc !== pc) return;
    this.call.signaling.send({ type: "publish", sdp: pc.localDescription.sdp });
    this.timers.push(setTimeout(() => {
      if (this.pc === pc && !pc.remoteDescription) this.call.endCall("The server did not answer the camera.");
    }, PUBLISH_TIMEOUT_MS));
  }

  // The server's `camera-rate`: the most frames a second its pipeline can use (the rest would be encoded
  // here and decoded there for nothing).
  async setFrameRate(fps) {
    const sender = this.pc?.getSenders().find((s) => s.track?.kind === "video");
    if (!sender || !Number.isFinite(fps) || fps < 1) return;
    const params = sender.getParameters();
    if (!params.encodings?.length) return;
    params.encodings[0].maxFramerate = fps;
    await sender.setParameters(params);
    this.frameRate = fps;
  }

  async onPublished(sdp) {
    if (!this.pc || this.pc.signalingState !== "have-local-offer") return;
    await this.pc.setRemoteDescription({ type: "answer", sdp });
  }

  send(message) {
    if (this.channel && this.channel.readyState === "open") this.channel.send(JSON.stringify(message));
  }

  close() {
    for (const t of this.timers) { clearTimeout(t); clearInterval(t); }
    this.timers = [];
    if (this.channel) { this.channel.onclose = null; this.channel.close(); this.channel = null; }
    if (this.pc) { this.pc.close(); this.pc = null; }
  }
}

// ---------------------------------------------------------------------------------------------
// Call: the room seen from inside it.

class Call extends Room {
  constructor() {
    super();
    this.texts = {
      title: "Call · Portrait telepresence",
      waiting: "Waiting for the others",
      waitingTitle: `Nobody else is in room “${ROOM}” yet`,
      waitingDetail: "Send them the address of this page.",
      left: "The others left — waiting",
    };
    this.offlineTileMs = LEFT_TILE_MS;
    this.state = "lobby";             // lobby | joining | in-call | ended
    this.stream = null;
    this.uplink = null;
    this.avatarId = null;             // this person's own avatar in the room: not shown
    this.head = { yaw: 0, pitch: 0, dist: 1 };
    this.tracking = null;             // the server sees this person's face (null: not told yet)
    this.headTracking = params.get("head") !== "off";
    this.name = $("#name");
    this.name.value = params.get("name") || localStorage.getItem("telepresence-name") || "";
    // who gives no name gets one of their own (two are not both "Guest"), kept while the page lives: a rejoin after a
    // lost socket is under the same name, which is how room.js knows a returning sender
    this.defaultName = `guest-${crypto.getRandomValues(new Uint16Array(1))[0].toString(16).padStart(4, "0")}`;
    this.name.placeholder = this.defaultName;
    $("#lobby-room").textContent = ROOM;
    document.title = `${ROOM} · ${this.texts.title}`;
    $("#join").addEventListener("click", () => this.joinCall());
    this.name.addEventListener("keydown", (e) => { if (e.key === "Enter") this.joinCall(); });
    $("#leave").addEventListener("click", () => this.leave());
    $("#head-toggle").addEventListener("click", () => this.setHeadTracking(!this.headTracking));
    window.addEventListener("pagehide", () => { if (this.uplink) this.signaling.send({ type: "unpublish" }); });
    this.setHeadTracking(this.headTracking);
    this.setCallState("lobby");
  }

  joinName() { return this.name.value.trim().replace(/[^\P{C}]/gu, "").slice(0, 40) || this.defaultName; }

  acceptsSender(peer) { return peer.id !== this.avatarId; }

  handleKey(e) {
    if (e.key !== "h" && e.key !== "H") return false;
    this.setHeadTracking(!this.headTracking);
    return true;
  }

  setCallState(state, message = "") {
    this.state = state;
    document.body.dataset.call = state;
    $("#lobby-message").textContent = message;
    $("#join").textContent = state === "ended" ? "Join again" : "Share camera and join";
    $("#join").disabled = state === "joining";
    this.renderSelf();
  }

  // -- joining and leaving --

  async joinCall() {
    if (this.state === "joining" || this.state === "in-call") return;
    if (this.state === "ended") { location.reload(); return; }  // a fresh page: fresh ids, fresh connections
    if (!navigator.mediaDevices?.getUserMedia) {
      this.setCallState("lobby", "This browser gives no camera to this page: open it at http://localhost:… or over https.");
      return;
    }
    localStorage.setItem("telepresence-name", this.name.value.trim());
    this.setCallState("joining", "Starting your camera…");
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({ video: CAMERA, audio: false });
    } catch (error) {
      this.setCallState("lobby", `No camera: ${error.message || error.name}.`);
      return;
    }
    $("#self-video").srcObject = this.stream;
    this.setCallState("joining", "Joining…");
    this.start();  // the room: signaling, tiles; the camera is offered once joined (onSignalingMessage)
  }

  leave() {
    if (this.state !== "in-call" && this.state !== "joining") return;
    this.signaling.send({ type: "unpublish" });
    this.endCall("You left the call. Your camera is off.");
  }

  endCall(message) {
    if (this.state === "ended") return;
    this.uplink?.close();
    this.uplink = null;
    for (const track of this.stream?.getTracks() || []) track.stop();
    this.stream = null;
    $("#self-video").srcObject = null;
    this.signaling.stop();
    for (const tile of [...this.tiles.values()]) this.removeTile(tile);
    this.poseOffset = null;
    this.setCallState("ended", message);
    this.refreshConnection();
  }

  // -- messages --

  onSignalingMessage(message) {
    const tile = message.type === "peer-left" ? this.tiles.get(message.id) : null;
    super.onSignalingMessage(message);
    if (this.fatal && (this.state === "joining" || this.state === "in-call")) {  // refused the room (its name, a token)
      this.endCall(this.fatal);
      return;
    }
    if (message.type === "joined" && this.stream && !this.uplink) {
      this.uplink = new Uplink(this, this.stream);
      this.uplink.start().catch((error) => this.endCall(`Could not offer the camera: ${error.message || error}`));
    } else if (message.type === "peer-joined" && message.peer?.role === "sender" && this.acceptsSender(message.peer)) {
      this.toast(`${message.peer.name || "Someone"} joined`);
    } else if (tile) {
      this.toast(`${tile.name} left`);
    }
  }

  onOtherMessage(message) {
    if (message.type === "published") {
      this.avatarId = message.id;
      const own = this.tiles.get(message.id);
      if (own) this.removeTile(own);
      this.roomSenders.delete(message.id);
      this.uplink?.onPublished(message.sdp).catch((error) => this.endCall(`The server's answer failed: ${error.message || error}`));
      this.setCallState("in-call");
      this.refreshConnection();
    } else if (message.type === "unpublished") {
      this.endCall(this.state === "joining" ? `The server could not take your camera: ${message.reason}.`
                                            : `The server dropped your camera: ${message.reason}.`);
    }
  }

  onUplinkMessage(message) {
    switch (message.type) {
      case "head":
        if (![message.yaw, message.pitch, message.dist].every(Number.isFinite)) return;
        this.head = { yaw: message.yaw, pitch: message.pitch, dist: message.dist };
        if (this.tracking !== message.tracking) { this.tracking = Boolean(message.tracking); this.renderSelf(); }
        if (this.headTracking) { this.poseOffset = this.head; this.posesChanged(); }
        break;
      case "camera-rate":
        this.uplink?.setFrameRate(message.fps).catch((error) => console.warn("camera rate not applied:", error));
        break;
      case "unpublished":
        this.endCall(`The server dropped your camera: ${message.reason}.`);
        break;
    }
  }

  // -- head tracking --

  setHeadTracking(on) {
    this.headTracking = on;
    $("#head-toggle").setAttribute("aria-pressed", String(on));
    this.poseOffset = on && this.state === "in-call" ? this.head : null;
    this.posesChanged();
    this.renderSelf();
  }

  // -- what the page shows --

  renderSelf() {
    const self = $("#self");
    let text = "You";
    if (this.state === "joining") text = "Starting your avatar…";
    else if (this.state === "in-call") {
      if (this.tracking === false) text = "The server cannot see your face: the others see your last good avatar";
      else if (this.tracking === null) text = "Starting your avatar…";
      else text = this.headTracking ? "You · head tracking on" : "You · head tracking off";
    }
    self.dataset.tracking = this.tracking === false ? "lost" : "ok";
    $("#self-status").textContent = text;
  }

  refreshConnection() {
    super.refreshConnection();
    if (this.state === "lobby" || this.state === "ended") {
      $("#connection").dataset.state = this.state === "ended" ? "waiting" : "connecting";
      $("#connection-text").textContent = this.state === "ended" ? "Left the call" : "Not joined";
    }
  }

  toast(text) {
    const el = document.createElement("div");
    el.className = "toast";
    el.textContent = text;
    $("#toasts").appendChild(el);
    setTimeout(() => el.remove(), TOAST_MS);
  }
}

window.telepresence = new Call();
