// Photos to model input exactly as edgetl/preprocess.py does it, without DOM: Pillow's bilinear
// resize with antialiasing (its 8-bit fixed-point two-pass resampling, src/libImaging/Resample.c)
// and the float32 scaling. The page decodes with the browser (edgetl.js); node --test checks this
// module against Pillow's own pixels.

function coefficients(inSize, outSize) {
  const scale = inSize / outSize, filterscale = Math.max(scale, 1), support = filterscale;
  const ksize = Math.ceil(support) * 2 + 1, bounds = new Int32Array(outSize * 2), kk = new Int32Array(outSize * ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale, ss = 1 / filterscale;
    let xmin = Math.trunc(center - support + 0.5); if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5); if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    const k = new Float64Array(xmax);
    let ww = 0;
    for (let x = 0; x < xmax; x++) { const t = Math.abs((x + xmin - center + 0.5) * ss); k[x] = t < 1 ? 1 - t : 0; ww += k[x]; }
    for (let x = 0; x < xmax; x++) {
      const v = ww !== 0 ? k[x] / ww : k[x];
      kk[xx * ksize + x] = v < 0 ? Math.trunc(-0.5 + v * 4194304) : Math.trunc(0.5 + v * 4194304);
    }
    bounds[xx * 2] = xmin; bounds[xx * 2 + 1] = xmax;
  }
  return { ksize, bounds, kk };
}

const clip8 = (ss) => { const v = Math.floor(ss / 4194304); return v < 0 ? 0 : v > 255 ? 255 : v; };

function horizontal(src, w, rows, offset, size, H) { // rows [offset, offset + rows) of src, width w -> size
  const out = new Uint8Array(size * rows * 3);
  for (let yy = 0; yy < rows; yy++) {
    const ro = (yy + offset) * w * 3;
    for (let xx = 0; xx < size; xx++) {
      const xmin = H.bounds[xx * 2], xmax = H.bounds[xx * 2 + 1], ko = xx * H.ksize;
      let s0 = 2097152, s1 = 2097152, s2 = 2097152;
      for (let x = 0; x < xmax; x++) {
        const k = H.kk[ko + x], p = ro + (x + xmin) * 3;
        s0 += src[p] * k; s1 += src[p + 1] * k; s2 += src[p + 2] * k;
      }
      const o = (yy * size + xx) * 3;
      out[o] = clip8(s0); out[o + 1] = clip8(s1); out[o + 2] = clip8(s2);
    }
  }
  return out;
}

function vertical(src, w, shift, size, V) { // width w, rows -> size (bounds shifted by `shift`)
  const out = new Uint8Array(w * size * 3);
  for (let yy = 0; yy < size; yy++) {
    const ymin = V.bounds[yy * 2] - shift, ymax = V.bounds[yy * 2 + 1], ko = yy * V.ksize;
    for (let xx = 0; xx < w; xx++) {
      let s0 = 2097152, s1 = 2097152, s2 = 2097152;
      for (let y = 0; y < ymax; y++) {
        const k = V.kk[ko + y], p = ((y + ymin) * w + xx) * 3;
        s0 += src[p] * k; s1 += src[p + 1] * k; s2 += src[p + 2] * k;
      }
      const o = (yy * w + xx) * 3;
      out[o] = clip8(s0); out[o + 1] = clip8(s1); out[o + 2] = clip8(s2);
    }
  }
  return out;
}

/** RGB pixels (w x h x 3, Uint8Array) resized to size x size like Pillow's Image.resize(BILINEAR)
 * (Pillow 13: the vertical pass first when the height shrinks more than twice the width). */
export function resizeRGB(rgb, w, h, size) {
  const needH = w !== size, needV = h !== size;
  if (!needH && !needV) return rgb;
  const horizontalFirst = !((h - size) > 0 && (h - size) > (w - size) * 2);
  const V = needV ? coefficients(h, size) : null, H = needH ? coefficients(w, size) : null;
  if (horizontalFirst) {
    let src = rgb, shift = 0;
    if (needH) {
      const first = needV ? V.bounds[0] : 0, last = needV ? V.bounds[(size - 1) * 2] + V.bounds[(size - 1) * 2 + 1] : h;
      src = horizontal(rgb, w, last - first, first, size, H);
      shift = first;
    }
    return needV ? vertical(src, size, shift, size, V) : src;
  }
  const src = needV ? vertical(rgb, w, 0, size, V) : rgb;
  return needH ? horizontal(src, w, size, 0, size, H) : src;
}

export function normalize(pixels, spec) {
  const scale = Math.fround(spec.scale), off = spec.offset.map(Math.fround), out = new Float32Array(pixels.length);
  const bgr = spec.channel_order === "BGR";
  for (let i = 0; i < pixels.length; i += 3) {
    for (let c = 0; c < 3; c++) out[i + c] = Math.fround(pixels[i + (bgr ? 2 - c : c)] * scale) + off[c];
  }
  return out;
}

