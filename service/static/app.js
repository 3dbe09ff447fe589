// Clinician page: send one scan to POST /diagnose and show the finding, the outlined lesion and
// the models that produced them. Plain browser JavaScript, no dependencies, no network access
// beyond this service: it must work inside a hospital network.
//
// Nothing is stored: the chosen file stays in this tab's memory (so another frame can be
// analysed) and every object URL is revoked when the next result replaces it.
"use strict";

// Relative, so the page also works behind a reverse proxy that mounts the service under a prefix.
const DIAGNOSE_URL = "diagnose";

// Mirrors the service's default body limit; only used to word the error sentence.
const MAX_UPLOAD_MB = 20;

const CLASS_ORDER = ["normal", "benign", "malignant"];

// One sentence per error code of the public API (service/errors.py). A clinician reads these,
// so they say what happened and what to do, never how the service works inside.
const ERROR_SENTENCES = {
  empty_input: "The file is empty. Choose a scan image.",
  unsupported_format: "This file is not a PNG, JPEG or DICOM image.",
  format_mismatch:
    "The file's contents do not match its declared type. Export the scan again as PNG, JPEG or DICOM.",
  corrupt_image: "The image file is damaged or incomplete and cannot be read.",
  image_too_large: "The image is too large to analyse (too many pixels or frames).",
  image_too_small: "The image is too small to analyse.",
  no_pixel_data: "This DICOM file holds no image (it may be a report or a plan).",
  not_ultrasound:
    "This DICOM image is not an ultrasound scan (its modality is not US). Choose a breast-ultrasound image.",
  non_image_dicom:
    "This DICOM file is not an image (it is a segmentation, a report or a radiotherapy object).",
  unsupported_dicom: "This DICOM image is stored in an encoding the service cannot read.",
  frame_out_of_range: "That frame does not exist in this file.",
  body_too_large: `The file is larger than ${MAX_UPLOAD_MB} MB.`,
  unsupported_media_type: "This file is not a PNG, JPEG or DICOM image.",
  missing_file: "No file was received. Choose the scan again.",
  model_unavailable: "The analysis models are not ready yet. Please try again in a minute.",
  artifact_not_found: "The analysis models are not available right now. Please try again later.",
  artifact_integrity: "The analysis models are not available right now. Please try again later.",
  invalid_request: "The page sent a request the service did not accept. Reload the page and try again.",
  internal_error:
    "The service could not analyse this scan because of an internal problem. Please try again.",
  forbidden: "This API key may not analyse scans. Ask for a key with the \u201cinfer\u201d scope.",
  request_timeout: "The upload took too long and was stopped. Check the connection and try again.",
  overloaded: "The service is busy. Please try again in a moment.",
};

// The API key, when the service requires one: this tab only (sessionStorage), never a cookie.
const KEY_STORAGE = "busi-api-key";

// When a response carries no known code (a proxy in between, an old service), word it by status.
const STATUS_CODES = { 413: "body_too_large", 415: "unsupported_format", 503: "model_unavailable" };

const GENERIC_SENTENCE = "The scan could not be analysed. Please try again.";
const NETWORK_SENTENCE =
  "The analysis service could not be reached. Check the network connection and try again.";

// Overlay colour: yellow stands out on a grayscale scan and is not a red/green finding colour.
const LESION_RGB = [255, 204, 0];

const $ = (id) => document.getElementById(id);

const el = {
  dropzone: $("dropzone"),
  fileInput: $("file-input"),
  fileButton: $("file-button"),
  status: $("status"),
  error: $("error"),
  results: $("results"),
  scanCanvas: $("scan-canvas"),
  overlayCanvas: $("overlay-canvas"),
  scanCaption: $("scan-caption"),
  overlayControls: $("overlay-controls"),
  overlayToggle: $("overlay-toggle"),
  overlayOpacity: $("overlay-opacity"),
  overlayOpacityValue: $("overlay-opacity-value"),
  frameForm: $("frame-form"),
  frameInput: $("frame-input"),
  frameRange: $("frame-range"),
  frameButton: $("frame-button"),
  findingLabel: $("finding-label"),
  qualityWarning: $("quality-warning"),
  qualityReasons: $("quality-reasons"),
  uncertainNote: $("uncertain-note"),
  bars: $("probability-bars"),
  classificationModel: $("classification-model"),
  lesionFacts: $("lesion-facts"),
  segmentationModel: $("segmentation-model"),
  downloadMask: $("download-mask"),
  downloadJson: $("download-json"),
  requestId: $("request-id"),
  keyForm: $("key-form"),
  keyPrompt: $("key-prompt"),
  keyInput: $("key-input"),
};

const state = {
  file: null, // the File being analysed, kept so another frame can be requested
  controller: null, // AbortController of the request in flight
  objectUrls: [], // revoked when the next result replaces this one
  mask: null, // {width, height, fill: Uint8Array (1 = lesion), edge: Int32Array of pixel indices}
  nFrames: 1,
  pending: null, // {file, frame} waiting for an API key
};

// ---- page state -------------------------------------------------------------------------------

function setState(name) {
  // Read by the browser tests and by CSS (busy cursor, spinner).
  document.body.dataset.state = name;
}

function setBusy(busy, message) {
  el.fileInput.disabled = busy;
  el.fileButton.classList.toggle("disabled", busy);
  el.frameInput.disabled = busy;
  el.frameButton.disabled = busy;
  el.results.setAttribute("aria-busy", busy ? "true" : "false");
  el.status.textContent = busy ? message : "";
  el.status.classList.toggle("busy", busy);
  if (busy) setState("busy");
}

function showError(sentence, requestId) {
  el.error.replaceChildren();
  const p = document.createElement("p");
  p.textContent = sentence;
  el.error.append(p);
  if (requestId) {
    const ref = document.createElement("p");
    ref.className = "meta";
    ref.textContent = `Reference for support: ${requestId}`;
    el.error.append(ref);
  }
  el.error.hidden = false;
  setState("error");
}

function clearError() {
  el.error.hidden = true;
  el.error.replaceChildren();
}

function revokeObjectUrls() {
  for (const url of state.objectUrls) URL.revokeObjectURL(url);
  state.objectUrls = [];
}

function objectUrl(blob) {
  const url = URL.createObjectURL(blob);
  state.objectUrls.push(url);
  return url;
}

// ---- talking to the service -------------------------------------------------------------------

async function analyse(file, frame) {
  if (state.controller) state.controller.abort();
  const controller = new AbortController();
  state.controller = controller;
  state.file = file;

  clearError();
  el.keyForm.hidden = true;
  setBusy(true, frame > 0 ? `Analysing frame ${frame + 1}…` : "Analysing the scan…");

  // The raw bytes as application/octet-stream: the service decides the format from the bytes,
  // so a scan exported with an odd file extension is still read correctly.
  const query = new URLSearchParams({ include_image: "true", frame: String(frame) });
  const key = sessionStorage.getItem(KEY_STORAGE);
  let response;
  let body = null;
  try {
    const headers = { "Content-Type": "application/octet-stream", Accept: "application/json" };
    if (key) headers.Authorization = `Bearer ${key}`;
    response = await fetch(`${DIAGNOSE_URL}?${query}`, {
      method: "POST",
      headers,
      body: file,
      signal: controller.signal,
    });
    try {
      body = await response.json();
    } catch {
      body = null; // not JSON (a proxy's HTML error page, say): worded by status below
    }
  } catch (err) {
    if (controller.signal.aborted) return; // replaced by a newer request
    setBusy(false);
    showError(NETWORK_SENTENCE);
    return;
  }
  if (controller.signal.aborted) return;
  state.controller = null;

  if (response.status === 401) {
    setBusy(false);
    askForKey(file, frame, Boolean(key));
    return;
  }

  if (!response.ok || !body || !body.classification) {
    setBusy(false);
    showError(errorSentence(response.status, body), body?.error?.request_id ?? body?.request_id);
    return;
  }
  try {
    await render(body, file, frame);
  } catch (err) {
    console.error(err);
    showError("The result could not be displayed. Please try again.", body.request_id);
  } finally {
    setBusy(false);
  }
  if (!el.error.hidden) return;
  setState("result");
}

function askForKey(file, frame, rejected) {
  // No key, or one the service did not accept: ask, then run the same scan again.
  if (rejected) sessionStorage.removeItem(KEY_STORAGE);
  state.pending = { file, frame };
  el.keyPrompt.textContent = rejected
    ? "That API key was not accepted. Check it and paste it again."
    : "This service needs an API key. Paste yours to continue.";
  el.keyForm.hidden = false;
  el.keyInput.value = "";
  el.keyInput.focus();
  setState("key");
}

function errorSentence(status, body) {
  const code = body?.error?.code ?? STATUS_CODES[status];
  if (code && ERROR_SENTENCES[code]) return ERROR_SENTENCES[code];
  return GENERIC_SENTENCE;
}

// ---- rendering a result -----------------------------------------------------------------------

async function render(result, file, requestedFrame) {
  revokeObjectUrls();
  const cls = result.classification;
  const seg = result.segmentation ?? null;
  const info = result.image ?? {};

  renderFinding(cls);
  renderQuality(result.quality, cls);
  renderLesion(seg, info);
  renderFrameChooser(info, requestedFrame);
  renderDownloads(result, seg);

  el.results.hidden = false;
  await renderScan(result, file, seg, info);
}

function percent(p) {
  return `${(100 * p).toFixed(p >= 0.995 || p < 0.001 ? 0 : 1)} %`;
}

function modelText(task, model) {
  if (!model) return "";
  return `${task}: ${model.name} version ${model.version}`;
}

function renderFinding(cls) {
  el.findingLabel.textContent = capitalise(cls.label);
  el.findingLabel.dataset.label = cls.label;

  const names = [
    ...CLASS_ORDER.filter((c) => c in cls.probabilities),
    ...Object.keys(cls.probabilities).filter((c) => !CLASS_ORDER.includes(c)),
  ];
  el.bars.replaceChildren(
    ...names.map((name) => {
      const p = Number(cls.probabilities[name]) || 0;
      const li = document.createElement("li");
      li.className = "bar-row" + (name === cls.label ? " predicted" : "");
      li.dataset.class = name;

      const label = document.createElement("span");
      label.className = "bar-name";
      label.id = `bar-name-${name}`;
      label.textContent = capitalise(name);

      const track = document.createElement("span");
      track.className = "bar-track";
      track.setAttribute("role", "meter");
      track.setAttribute("aria-labelledby", label.id);
      track.setAttribute("aria-valuemin", "0");
      track.setAttribute("aria-valuemax", "100");
      track.setAttribute("aria-valuenow", (100 * p).toFixed(1));
      track.setAttribute("aria-valuetext", percent(p));
      const fill = document.createElement("span");
      fill.className = "bar-fill";
      fill.style.width = `${Math.max(0, Math.min(100, 100 * p))}%`;
      track.append(fill);

      const value = document.createElement("span");
      value.className = "bar-value";
      value.textContent = percent(p);

      li.append(label, track, value);
      return li;
    }),
  );
  el.classificationModel.textContent = modelText("Classification model", cls.model);
}

// The out-of-distribution flag and the uncertain band: the finding stays visible (the clinician
// decides), but it is marked as not to be relied on.
function renderQuality(quality, cls) {
  const flagged = quality ? quality.in_distribution === false : false;
  el.qualityWarning.hidden = !flagged;
  el.qualityReasons.replaceChildren(
    ...(flagged ? quality.reasons ?? [] : []).map((reason) => {
      const li = document.createElement("li");
      li.textContent = reason;
      return li;
    }),
  );
  el.uncertainNote.hidden = !cls.uncertain;
  el.findingLabel.dataset.reliable = cls.reliable === false ? "false" : "true";
  if (cls.reliable === false) el.findingLabel.textContent += " (not reliable)";
}

function renderLesion(seg, info) {
  const facts = [];
  if (!seg) {
    facts.push(["Outline", "Not computed: the finding is normal."]);
  } else if (!seg.bbox) {
    facts.push(["Outline", "The segmentation model outlined no lesion."]);
  } else {
    const { x, y, w, h } = bboxOf(seg);
    const area = Number(seg.lesion_area_fraction) || 0;
    let areaText = `${(100 * area).toFixed(1)} % of the image`;
    if (info.width && info.height) {
      areaText += ` (${Math.round(area * info.width * info.height).toLocaleString("en")} pixels)`;
    }
    facts.push(["Lesion area", areaText]);
    facts.push(["Bounding box", `${w} × ${h} pixels at x ${x}, y ${y} (from the top left)`]);
  }
  el.lesionFacts.replaceChildren(
    ...facts.flatMap(([term, value]) => {
      const dt = document.createElement("dt");
      dt.textContent = term;
      const dd = document.createElement("dd");
      dd.textContent = value;
      return [dt, dd];
    }),
  );
  el.segmentationModel.textContent = seg ? modelText("Segmentation model", seg.model) : "";
  el.overlayControls.hidden = !(seg && seg.bbox);
}

function renderFrameChooser(info, requestedFrame) {
  const nFrames = Number(info.n_frames) || 1;
  state.nFrames = nFrames;
  el.frameForm.hidden = nFrames <= 1;
  if (nFrames <= 1) return;
  // Frames are counted from 1 on the page; the API counts from 0.
  const frame = Number.isInteger(info.frame) ? info.frame : requestedFrame;
  el.frameRange.textContent = `(1 to ${nFrames})`;
  el.frameInput.max = String(nFrames);
  el.frameInput.value = String(frame + 1);
}

function renderDownloads(result, seg) {
  const id = safeName(result.request_id ?? "result");
  if (seg?.mask_png) {
    el.downloadMask.href = objectUrl(base64ToBlob(seg.mask_png, "image/png"));
    el.downloadMask.download = `lesion-mask-${id}.png`;
    el.downloadMask.removeAttribute("aria-disabled");
    el.downloadMask.hidden = false;
  } else {
    el.downloadMask.removeAttribute("href");
    el.downloadMask.hidden = true;
  }
  // The JSON as the service returned it, minus the display copy of the scan: the download is
  // the result, and leaving the image out keeps patient pixels out of a file that gets passed on.
  const { image_png: _scan, ...saved } = result;
  const json = new Blob([JSON.stringify(saved, null, 2)], { type: "application/json" });
  el.downloadJson.href = objectUrl(json);
  el.downloadJson.download = `diagnosis-${id}.json`;
  el.requestId.textContent = result.request_id ? `Request ${result.request_id}` : "";
}

async function renderScan(result, file, seg, info) {
  // Prefer the frame exactly as the service analysed it (the only option for DICOM, which a
  // browser cannot display); fall back to the local PNG/JPEG.
  let source = null;
  if (result.image_png) {
    source = objectUrl(base64ToBlob(result.image_png, "image/png"));
  } else if (["png", "jpeg", "jpg"].includes(String(info.format ?? "").toLowerCase()) ||
             /^image\/(png|jpeg)$/.test(file.type)) {
    source = objectUrl(file);
  }

  const scan = source ? await loadImage(source).catch(() => null) : null;
  const mask = seg?.mask_png && seg.bbox
    ? await loadImage(objectUrl(base64ToBlob(seg.mask_png, "image/png")))
    : null;

  const width = info.width || scan?.naturalWidth || mask?.naturalWidth || 1;
  const height = info.height || scan?.naturalHeight || mask?.naturalHeight || 1;
  el.scanCanvas.parentElement.style.setProperty("--aspect", String(width / height));
  for (const canvas of [el.scanCanvas, el.overlayCanvas]) {
    canvas.width = width;
    canvas.height = height;
  }
  const ctx = el.scanCanvas.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, width, height);
  if (scan) ctx.drawImage(scan, 0, 0, width, height);

  state.mask = mask ? maskGeometry(mask, width, height) : null;
  drawOverlay();

  const parts = [];
  if (info.format) parts.push(String(info.format).toUpperCase());
  if (state.nFrames > 1 && Number.isInteger(info.frame)) {
    parts.push(`frame ${info.frame + 1} of ${state.nFrames}`);
  }
  parts.push(`${width} × ${height} pixels`);
  let caption = `${file.name} · ${parts.join(" · ")}`;
  if (!scan) caption += " · the scan itself cannot be shown, only the outline";
  el.scanCaption.textContent = caption;
  el.scanCanvas.setAttribute(
    "aria-label",
    state.mask ? "The analysed scan with the lesion outlined" : "The analysed scan",
  );
}

// Lesion pixels and their border, computed once per result so that the opacity slider and the
// toggle only repaint.
function maskGeometry(maskImage, width, height) {
  const scratch = document.createElement("canvas");
  scratch.width = width;
  scratch.height = height;
  const sctx = scratch.getContext("2d", { willReadFrequently: true });
  sctx.imageSmoothingEnabled = false;
  sctx.drawImage(maskImage, 0, 0, width, height);
  const rgba = sctx.getImageData(0, 0, width, height).data;

  const fill = new Uint8Array(width * height);
  for (let i = 0; i < fill.length; i++) fill[i] = rgba[4 * i] >= 128 ? 1 : 0;

  const edge = [];
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const i = y * width + x;
      if (!fill[i]) continue;
      if (x === 0 || y === 0 || x === width - 1 || y === height - 1 ||
          !fill[i - 1] || !fill[i + 1] || !fill[i - width] || !fill[i + width]) {
        edge.push(i);
      }
    }
  }
  return { width, height, fill, edge: Int32Array.from(edge) };
}

function drawOverlay() {
  const canvas = el.overlayCanvas;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const opacity = Number(el.overlayOpacity.value) / 100;
  el.overlayOpacityValue.textContent = `${el.overlayOpacity.value} %`;
  const m = state.mask;
  canvas.dataset.lesionPixels = m ? String(m.fill.reduce((a, b) => a + b, 0)) : "0";
  canvas.dataset.shown = String(Boolean(m && el.overlayToggle.checked));
  if (!m || !el.overlayToggle.checked) return;

  if (opacity > 0) {
    const img = ctx.createImageData(m.width, m.height);
    const alpha = Math.round(255 * opacity);
    const [r, g, b] = LESION_RGB;
    for (let i = 0; i < m.fill.length; i++) {
      if (!m.fill[i]) continue;
      const o = 4 * i;
      img.data[o] = r;
      img.data[o + 1] = g;
      img.data[o + 2] = b;
      img.data[o + 3] = alpha;
    }
    ctx.putImageData(img, 0, 0);
  }
  // The outline stays opaque whatever the fill opacity, and thick enough to see when a large
  // scan is shown scaled down.
  const shown = el.overlayCanvas.getBoundingClientRect().width || m.width;
  const t = Math.max(1, Math.round((1.5 * m.width) / shown));
  ctx.fillStyle = `rgb(${LESION_RGB.join(",")})`;
  for (const i of m.edge) {
    ctx.fillRect((i % m.width) - (t >> 1), Math.floor(i / m.width) - (t >> 1), t, t);
  }
}

// ---- helpers ----------------------------------------------------------------------------------

function base64ToBlob(b64, type) {
  const data = b64.startsWith("data:") ? b64.slice(b64.indexOf(",") + 1) : b64;
  const bin = atob(data);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new Blob([bytes], { type });
}

function loadImage(url) {
  const img = new Image();
  img.src = url;
  return img.decode().then(() => img);
}

// {x, y, width, height} as the service returns it; [x, y, w, h] is accepted as well.
function bboxOf(seg) {
  const b = seg.bbox;
  if (Array.isArray(b)) return { x: b[0], y: b[1], w: b[2], h: b[3] };
  return { x: b.x, y: b.y, w: b.width, h: b.height };
}

function capitalise(s) {
  return s ? s[0].toUpperCase() + s.slice(1) : "";
}

function safeName(s) {
  return String(s).replace(/[^A-Za-z0-9._-]/g, "").slice(0, 64) || "result";
}

// ---- wiring -----------------------------------------------------------------------------------

function chooseFile(file) {
  if (!file) return;
  // A new scan: the previous result must not stay on screen beside it, even if this one fails.
  el.results.hidden = true;
  analyse(file, 0);
}

el.fileInput.addEventListener("change", () => {
  const file = el.fileInput.files[0];
  chooseFile(file);
  el.fileInput.value = ""; // so choosing the same file again runs it again
});

for (const type of ["dragenter", "dragover"]) {
  el.dropzone.addEventListener(type, (event) => {
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
    el.dropzone.classList.add("dragging");
  });
}
el.dropzone.addEventListener("dragleave", (event) => {
  if (!el.dropzone.contains(event.relatedTarget)) el.dropzone.classList.remove("dragging");
});
el.dropzone.addEventListener("drop", (event) => {
  event.preventDefault();
  el.dropzone.classList.remove("dragging");
  if (el.fileInput.disabled) return;
  chooseFile(event.dataTransfer.files[0]);
});
// A file dropped beside the drop zone must not make the browser navigate away from the page.
for (const type of ["dragover", "drop"]) {
  window.addEventListener(type, (event) => event.preventDefault());
}

el.overlayToggle.addEventListener("change", drawOverlay);
el.overlayOpacity.addEventListener("input", drawOverlay);
window.addEventListener("resize", () => {
  if (state.mask) drawOverlay();
});

el.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const key = el.keyInput.value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORAGE, key);
  el.keyInput.value = "";
  el.keyForm.hidden = true;
  const pending = state.pending;
  state.pending = null;
  if (pending) analyse(pending.file, pending.frame);
});

el.frameForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const n = Number(el.frameInput.value);
  if (!Number.isInteger(n) || n < 1 || n > state.nFrames) {
    showError(`Choose a frame between 1 and ${state.nFrames}.`);
    return;
  }
  if (state.file) analyse(state.file, n - 1);
});

setState("idle");
