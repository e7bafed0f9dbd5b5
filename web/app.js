// Viewer page: join a room, one tile per sender, drag to orbit each sender's camera.
//
// Protocol (see telepresence/stream/messages.py): the page joins over the /ws socket
// (signaling.js), offers to every sender in the room and sends it poses and pings (tile.js,
// orbit.js), with {type: "stamps", on: true} beside each ping while the stats panel is open
// (stats.js, latency.js); the room and its status line are room.js, shared with the call page
// (call.js). No build step.

import { Room } from "./room.js";

const app = new Room();
app.start();
window.telepresence = app;
