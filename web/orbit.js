// Orbit: one sender's camera request, driven by pointer, wheel, pinch and keys (both pages).

export const DEFAULT_LIMITS = { yaw: 40, pitch: 25, distMin: 0.6, distMax: 1.6 };

export const clamp = (x, lo, hi) => Math.min(hi, Math.max(lo, x));

export class Orbit {
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
