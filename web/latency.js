// Glass-to-glass latency measured in the page, not estimated.
//
// On this viewer's `stamps {on: true}` the sender paints each frame's capture time into the
// view's top-left corner (telepresence/stream/framecode.py: same layout, same checksum). Here it
// is read back from the frame being displayed (requestVideoFrameCallback) and subtracted from
// that frame's display time on the sender's clock, whose offset to ours comes from ping/pong:
//
//     latency = (t_display + offset) - t_capture          ms, modulo 2**24 (the stamp wraps)
//     offset  = t_sender - (t_ping + t_pong) / 2          the lowest-round-trip sample (NTP)

export const STAMP_WRAP = 2 ** 24;
const COLS = 7, ROWS = 4, CHECK_BITS = 4, VALUE_BITS = 24;
const PLAUSIBLE_MS = 10000;  // a longer "latency" is a misread stamp or a clock step
const WINDOW_MS = 1500;      // the median is over the frames displayed this long ago or less

// Milliseconds on a wall clock shared with the sender up to `offset`: performance's, not Date's
// (monotonic; the offset absorbs its difference to the sender's wall clock).
export const pageClockMs = (perfMs = performance.now()) => performance.timeOrigin + perfMs;

// The sender's clock minus the page's, from ping {t} / pong {t, wall_ms} pairs (framecode.ClockOffset).
export class ClockOffset {
  constructor(window = 16) {
    this.window = window;
    this.samples = [];  // {rtt, offset}, ms
  }

  add(sentMs, receivedMs, senderMs) {
    const rtt = receivedMs - sentMs;
    if (!(rtt >= 0) || !Number.isFinite(senderMs)) return;
    this.samples.push({ rtt, offset: senderMs - (sentMs + receivedMs) / 2 });
    if (this.samples.length > this.window) this.samples.shift();
  }

  get offsetMs() {
    if (this.samples.length === 0) return null;
    return this.samples.reduce((best, s) => (s.rtt < best.rtt ? s : best)).offset;
  }

  clear() { this.samples = []; }
}

function checksum(value) {
  let check = 0b1010;
  for (let shift = 0; shift < VALUE_BITS; shift += 4) check ^= (value >> shift) & 0xf;
  return check;
}

// The stamp in the video's current frame (read_frame_code's twin), or null if none decodes.
// `canvas` is a scratch canvas kept by the caller (one draw of the 7x4-cell corner per call).
export function readFrameCode(video, canvas) {
  const size = Math.min(video.videoWidth, video.videoHeight);
  if (!size) return null;
  const cell = Math.max(4, Math.floor(size / 32));
  const w = COLS * cell, h = ROWS * cell;
  const lo = Math.floor(cell / 4), hi = cell - Math.floor(cell / 4);  // cell centres: codec ringing stays at the edges
  if (canvas.width !== w) canvas.width = w;
  if (canvas.height !== h) canvas.height = h;
  const g = canvas.getContext("2d", { willReadFrequently: true });
  g.drawImage(video, 0, 0, w, h, 0, 0, w, h);
  const d = g.getImageData(0, 0, w, h).data;
  let word = 0;
  for (let r = 0; r < ROWS; r++) {
    for (let c = 0; c < COLS; c++) {
      let sum = 0, n = 0;
      for (let y = r * cell + lo; y < r * cell + hi; y++) {
        for (let x = c * cell + lo; x < c * cell + hi; x++) {
          const i = (y * w + x) * 4;
          sum += (d[i] + d[i + 1] + d[i + 2]) / 3;
          n++;
        }
      }
      word = word * 2 + (sum / n > 127.5 ? 1 : 0);
    }
  }
  const stamp = Math.floor(word / 2 ** CHECK_BITS), check = word % 2 ** CHECK_BITS;
  return checksum(stamp) === check ? stamp : null;
}

// Milliseconds from capture `stamp` to `shownMs` (page clock), on the sender's clock.
export function glassToGlassMs(stamp, shownMs, offsetMs) {
  return (((Math.round(shownMs + offsetMs) - stamp) % STAMP_WRAP) + STAMP_WRAP) % STAMP_WRAP;
}

// While started: reads the stamp of every displayed frame of `video`; medianMs over the last
// WINDOW_MS. Frames without a stamp (before the sender starts painting them) are skipped.
export class LatencyMeter {
  constructor(video, clock) {
    this.video = video;
    this.clock = clock;
    this.canvas = document.createElement("canvas");
    this.samples = [];  // {at, ms}
    this.handle = null;
    this.running = false;
  }

  start() {
    if (this.running) return;
    this.running = true;
    const frameCallback = "requestVideoFrameCallback" in this.video;
    const request = frameCallback ? (f) => this.video.requestVideoFrameCallback(f) : (f) => requestAnimationFrame(f);
    this.cancel = frameCallback ? (h) => this.video.cancelVideoFrameCallback(h) : (h) => cancelAnimationFrame(h);
    let lastTime = -1;
    const step = (now, meta) => {
      if (!this.running) return;
      if (frameCallback) this.measure(pageClockMs(meta?.expectedDisplayTime ?? now));
      else if (this.video.currentTime !== lastTime) {  // no frame callback (older Firefox): once per new frame, at paint time
        lastTime = this.video.currentTime;
        this.measure(pageClockMs(now));
      }
      this.handle = request(step);
    };
    this.handle = request(step);
  }

  stop() {
    this.running = false;
    if (this.handle !== null) { this.cancel(this.handle); this.handle = null; }
    this.clear();
  }

  clear() { this.samples = []; }

  measure(shownMs) {
    const offset = this.clock.offsetMs;
    if (offset === null || this.video.readyState < 2) return;
    const stamp = readFrameCode(this.video, this.canvas);
    if (stamp === null) return;
    const ms = glassToGlassMs(stamp, shownMs, offset);
    if (ms < PLAUSIBLE_MS) this.samples.push({ at: performance.now(), ms });
  }

  get medianMs() {
    const since = performance.now() - WINDOW_MS;
    this.samples = this.samples.filter((s) => s.at >= since);
    if (this.samples.length === 0) return null;
    const sorted = this.samples.map((s) => s.ms).sort((a, b) => a - b);
    return sorted[Math.floor(sorted.length / 2)];
  }
}
