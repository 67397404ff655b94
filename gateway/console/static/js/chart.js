// A line chart on a canvas: the last POINTS samples of a few series, no library.

const POINTS = 60;
/** Series colours; the legend swatches use the matching .swatch-N classes of console.css. */
export const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2"];

export class LineChart {
  /**
   * @param {HTMLCanvasElement} canvas where to draw
   * @param {{unit?: string, max?: number}} [options] a fixed top of the scale (e.g. 1 for a ratio)
   */
  constructor(canvas, options = {}) {
    this.canvas = canvas;
    this.unit = options.unit || "";
    this.max = options.max;
    this.series = new Map(); // name -> values
  }

  /** Add one sample per series (a series first seen starts with gaps). */
  push(values) {
    const length = this.series.size ? this.series.values().next().value.length : 0;
    for (const name of Object.keys(values)) {
      if (!this.series.has(name)) this.series.set(name, new Array(length).fill(null));
    }
    for (const [name, points] of this.series) {
      const value = values[name];
      points.push(value === undefined || value === null || Number.isNaN(value) ? null : value);
      if (points.length > POINTS) points.shift();
    }
    this.draw();
  }

  draw() {
    const ratio = window.devicePixelRatio || 1;
    const width = this.canvas.clientWidth;
    const height = this.canvas.clientHeight;
    if (!width || !height) return;
    this.canvas.width = Math.round(width * ratio);
    this.canvas.height = Math.round(height * ratio);
    const g = this.canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, width, height);

    let top = this.max;
    if (top === undefined) {
      top = 0;
      for (const points of this.series.values()) for (const v of points) if (v !== null) top = Math.max(top, v);
      top = niceCeiling(top);
    }
    const left = 40;
    const bottom = height - 14;
    g.font = "11px system-ui, sans-serif";
    g.fillStyle = "#555";
    g.strokeStyle = "#ddd";
    g.lineWidth = 1;
    for (const f of [0, 0.5, 1]) {
      const y = bottom - f * (bottom - 6);
      g.beginPath();
      g.moveTo(left, y);
      g.lineTo(width - 4, y);
      g.stroke();
      g.fillText(format(top * f), 2, y + 4);
    }
    g.fillText(`last ${POINTS} samples`, left, height - 2);

    const step = (width - 4 - left) / (POINTS - 1);
    let index = 0;
    for (const points of this.series.values()) {
      g.strokeStyle = PALETTE[index % PALETTE.length];
      g.lineWidth = 2;
      g.beginPath();
      let drawing = false;
      const offset = POINTS - points.length;
      points.forEach((v, i) => {
        if (v === null) {
          drawing = false;
          return;
        }
        const x = left + (offset + i) * step;
        const y = bottom - (top ? Math.min(v / top, 1) : 0) * (bottom - 6);
        if (drawing) g.lineTo(x, y);
        else g.moveTo(x, y);
        drawing = true;
      });
      g.stroke();
      index += 1;
    }
  }
}

function niceCeiling(value) {
  if (value <= 0) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const m of [1, 2, 5, 10]) if (value <= m * power) return m * power;
  return 10 * power;
}

/** A number for a scale or a readout: short, at most 3 significant digits. */
export function format(value) {
  if (value === null || value === undefined) return "–";
  if (Math.abs(value) >= 1000) return `${(value / 1000).toFixed(value >= 10000 ? 0 : 1)}k`;
  return Number.isInteger(value) ? String(value) : value.toPrecision(3).replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "");
}
