// Signaling: the /ws socket of a page, joining its room as a viewer and rejoining on its own with backoff.
//
// Calls outlive the signaling socket (media flows peer to peer): when the socket drops, or the
// receiver restarts, the page rejoins with the `resume` token of its last `joined`, keeps its id,
// and keeps every live call.

export const params = new URLSearchParams(location.search);
export const ROOM = params.get("room") || "demo";
export const TOKEN = params.get("token") || null;
const SIGNALING_URL = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;

export class Signaling {
  // app: onSignalingMessage(message), onSignalingLost(), joinName() (the name the room shows).
  constructor(app) {
    this.app = app;
    this.ws = null;
    this.backoffMs = 500;
    this.stopped = false;
    this.resume = null;  // the last `joined`'s token: rejoin under the same id
    this.inRoom = false;  // this socket's join answered (an error before it answers the join itself)
  }

  connect() {
    const ws = new WebSocket(SIGNALING_URL);
    this.ws = ws;
    this.inRoom = false;
    ws.onopen = () => {
      const join = { type: "join", room: ROOM, role: "viewer", name: this.app.joinName() };
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

  joined(resume) { this.backoffMs = 500; this.inRoom = true; if (typeof resume === "string") this.resume = resume; }

  stop() { this.stopped = true; this.ws?.close(); }

  send(message) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(message));
  }
}
