// The convserve console: models, predictions, convolutions and traffic, drawn from the
// server's ordinary HTTP APIs. Plain JavaScript with no dependencies and no build step;
// the DOM is built with textContent only, so nothing a server or a model returns can
// become markup.
"use strict";

(() => {
  const TOKEN_KEY = "convserve-token";
  const MAX_NUMBER_GRID = 16; // outputs up to this many rows and columns are shown as numbers
  const MAX_MAPS_PER_LAYER = 64;
  const TOP_CLASSES = 5;

  const $ = (id) => document.getElementById(id);

  const state = {
    config: { poll_interval_s: 2, token_required: false, traffic_interval_s: 2 },
    token: sessionStorage.getItem(TOKEN_KEY) || "",
    defaultModel: "",
    models: [],
    metadata: new Map(), // "name@version" -> metadata
    prepared: null, // the last prepared image: {model_name, model_version, shape, image}
    lastSource: null, // what was last predicted: {blob, type}, for another model to try
    lastConv: null,
    convSeq: 0,
    modelsShown: "",
    predictSeq: 0,
    pollTimer: 0,
    refreshes: 0,
  };

  // ---- HTTP -----------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function needsToken() {
    return state.config.token_required && !state.token;
  }

  async function api(path, { method = "GET", json, body, contentType } = {}) {
    if (needsToken()) {
      askToken("");
      throw new ApiError(401, "a token is required");
    }
    const headers = {};
    const sent = state.token;
    if (sent) headers.Authorization = `Bearer ${sent}`;
    let payload = body;
    if (json !== undefined) {
      payload = JSON.stringify(json);
      headers["Content-Type"] = "application/json";
    } else if (contentType) {
      headers["Content-Type"] = contentType;
    }
    const response = await fetch(path, { method, headers, body: payload, cache: "no-store" });
    const text = await response.text();
    let value = null;
    try {
      value = text ? JSON.parse(text) : null;
    } catch {
      value = null;
    }
    if (response.status === 401) {
      // A refusal of a token already replaced (calls were in flight) is not news.
      if (state.token === sent) askToken(sent ? "The server did not accept that token." : "");
      throw new ApiError(401, "a token is required");
    }
    if (!response.ok) {
      const message = value && typeof value.error === "string" ? value.error : `HTTP ${response.status}`;
      throw new ApiError(response.status, message);
    }
    return value;
  }

  const enc = encodeURIComponent;

  function showError(id, error) {
    const element = $(id);
    if (!error) {
      element.textContent = "";
      return;
    }
    // A missing token is asked for in its own dialog, not reported in every panel.
    element.textContent = error instanceof ApiError && error.status === 401 ? "" : String(error.message || error);
  }

  // ---- Token ----------------------------------------------------------------------

  function askToken(message) {
    if (state.token && message) {
      state.token = "";
      sessionStorage.removeItem(TOKEN_KEY);
    }
    const dialog = $("token-dialog");
    // A refusal stays on show until the person tries again.
    if (message || !dialog.open) $("token-error").textContent = message;
    if (!dialog.open) dialog.showModal();
    $("token-input").focus();
  }

  function setUpToken() {
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const input = $("token-input");
      const token = input.value.trim();
      input.value = "";
      if (!/^[\x21-\x7e]+$/.test(token)) {
        $("token-error").textContent = "token: printable ASCII characters without spaces expected";
        return;
      }
      state.token = token;
      sessionStorage.setItem(TOKEN_KEY, token);
      $("token-error").textContent = "";
      $("token-dialog").close();
      $("token-button").hidden = false;
      refreshNow();
    });
    $("token-button").addEventListener("click", () => askToken(""));
  }

  // ---- DOM helpers ----------------------------------------------------------------

  function el(tag, { className, text, data } = {}, children = []) {
    const element = document.createElement(tag);
    if (className) element.className = className;
    if (text !== undefined) element.textContent = text;
    if (data) for (const [key, value] of Object.entries(data)) element.dataset[key] = String(value);
    for (const child of children) element.append(child);
    return element;
  }

  function formatNumber(value, digits = 4) {
    if (value === null || value === undefined) return "–";
    if (Object.is(value, -0)) return "0";
    if (Number.isInteger(value)) return String(value);
    return String(Number(value.toPrecision(digits)));
  }

  function numbersTable(grid, id, digits = 4) {
    const table = el("table", { className: "numbers" });
    if (id) table.id = id;
    for (const row of grid) {
      const tr = el("tr");
      for (const value of row) tr.append(el("td", { text: formatNumber(value, digits), data: { value } }));
      table.append(tr);
    }
    return table;
  }

  // Draws a 2-D grid of numbers into `canvas`, `scale` CSS pixels per value. Values of
  // both signs are drawn around mid-gray; others from black (lowest) to white (highest).
  function drawGrid(canvas, grid, scale) {
    const rows = grid.length;
    const cols = rows ? grid[0].length : 0;
    canvas.width = Math.max(cols, 1);
    canvas.height = Math.max(rows, 1);
    canvas.style.width = `${Math.max(cols, 1) * scale}px`;
    canvas.style.height = `${Math.max(rows, 1) * scale}px`;
    if (!rows || !cols) return;
    let low = Infinity;
    let high = -Infinity;
    for (const row of grid) for (const v of row) { low = Math.min(low, v); high = Math.max(high, v); }
    const signed = low < 0;
    const reach = signed ? Math.max(-low, high) : high - low;
    const image = canvas.getContext("2d").createImageData(cols, rows);
    let i = 0;
    for (const row of grid) {
      for (const v of row) {
        let gray;
        if (reach === 0) gray = signed || v === 0 ? 128 : 255;
        else if (signed) gray = 128 + (127 * v) / reach;
        else gray = (255 * (v - low)) / reach;
        image.data[i] = image.data[i + 1] = image.data[i + 2] = Math.round(gray);
        image.data[i + 3] = 255;
        i += 4;
      }
    }
    canvas.getContext("2d").putImageData(image, 0, 0);
  }

  function gridScale(grid, room = 240) {
    const side = Math.max(grid.length, grid.length ? grid[0].length : 0, 1);
    return Math.max(1, Math.min(32, Math.floor(room / side)));
  }

  // ---- Models ---------------------------------------------------------------------

  async function metadataOf(name, version) {
    const key = `${name}@${version}`;
    if (!state.metadata.has(key)) {
      const value = await api(`../v1/convserve/models/${enc(name)}/versions/${version}/metadata`);
      state.metadata.set(key, value);
    }
    return state.metadata.get(key);
  }

  function servingVersion(model) {
    const serving = model.versions.find((v) => v.serving);
    return serving ? serving.version : null;
  }

  async function refreshModels() {
    try {
      const value = await api("../v1/convserve/models");
      state.defaultModel = value.default_model;
      state.models = value.models;
      const metas = await Promise.all(
        value.models.map(async (model) => {
          const version = servingVersion(model);
          if (version === null) return null;
          try {
            return await metadataOf(model.name, version);
          } catch {
            return null; // unloading right now; the next refresh catches up
          }
        }),
      );
      // Redrawn only when something changed, so a selection or a hover survives polls.
      const shown = JSON.stringify([value, metas]);
      if (shown !== state.modelsShown) {
        state.modelsShown = shown;
        renderModels(value.models, metas);
      }
      updateModelChoice();
      state.refreshes += 1;
      const stamp = $("models-refreshed");
      stamp.textContent = new Date().toLocaleTimeString();
      stamp.dataset.refreshes = String(state.refreshes);
      const ready = value.models.filter((m) => m.ready).length;
      $("server-state").textContent = `${ready} of ${value.models.length} models ready`;
      showError("models-error", null);
    } catch (error) {
      showError("models-error", error);
      if (!(error instanceof ApiError && error.status === 401)) {
        $("server-state").textContent = "server not answering";
      }
    }
  }

  function classesText(meta) {
    if (!meta) return "–";
    if (meta.class_names && meta.class_names.length) {
      const names = meta.class_names;
      return names.length > 10 ? `${names.slice(0, 10).join(", ")}, … (${names.length})` : names.join(", ");
    }
    const out = meta.outputs && meta.outputs[0];
    const count = out ? out.shape[out.shape.length - 1] : 0;
    return count > 0 ? `${count} (0–${count - 1})` : "–";
  }

  function inputText(meta) {
    if (!meta || !meta.inputs || !meta.inputs.length) return "–";
    const input = meta.inputs[0];
    return `${input.shape.slice(1).join("×")} ${input.dtypes.join("/")}`;
  }

  function renderModels(models, metas) {
    const body = $("models-table").tBodies[0];
    body.replaceChildren();
    models.forEach((model, index) => {
      const meta = metas[index];
      const nameCell = el("td", {}, [el("strong", { text: model.name })]);
      if (model.name === state.defaultModel) nameCell.append(" ", el("span", { className: "badge default", text: "default" }));
      const stateCell = el("td", {}, [
        el("span", { className: `badge ${model.ready ? "ready" : "unready"}`, text: model.ready ? "ready" : "not ready" }),
      ]);
      if (model.error) stateCell.append(el("span", { className: "version-error", text: model.error }));
      const versionsCell = el("td");
      for (const v of model.versions) {
        const classes = `badge ${v.state}${v.serving ? " serving" : ""}`;
        const text = `v${v.version} ${v.state}${v.serving ? " · serving" : ""}`;
        versionsCell.append(el("span", { className: classes, text, data: { version: v.version, state: v.state } }));
        if (v.error) versionsCell.append(el("span", { className: "version-error", text: `v${v.version}: ${v.error}` }));
      }
      if (!model.versions.length) versionsCell.append(el("span", { className: "muted", text: "none found" }));
      const labelsCell = el("td");
      for (const [label, version] of Object.entries(model.labels || {})) {
        labelsCell.append(el("span", { className: "badge", text: `${label} → v${version}` }));
      }
      for (const problem of model.label_errors || []) labelsCell.append(el("span", { className: "version-error", text: problem }));
      if (!labelsCell.childNodes.length) labelsCell.textContent = "–";
      const row = el("tr", { data: { model: model.name } }, [
        nameCell,
        stateCell,
        versionsCell,
        labelsCell,
        el("td", { text: inputText(meta) }),
        el("td", { text: classesText(meta) }),
      ]);
      body.append(row);
    });
  }

  function updateModelChoice() {
    const select = $("try-model");
    const current = select.value;
    const ready = state.models.filter((m) => m.ready).map((m) => m.name);
    const names = Array.from(select.options).map((o) => o.value);
    if (names.join("\n") !== ready.join("\n")) {
      select.replaceChildren(...ready.map((name) => el("option", { text: name })));
      for (const option of select.options) option.value = option.textContent;
    }
    if (ready.includes(current)) select.value = current;
    else if (ready.includes(state.defaultModel)) select.value = state.defaultModel;
  }

  // ---- Try it ---------------------------------------------------------------------

  let predictionTimer = 0;

  function setUpDrawing() {
    const canvas = $("draw-canvas");
    const context = canvas.getContext("2d");
    const clear = () => {
      context.fillStyle = "#fff";
      context.fillRect(0, 0, canvas.width, canvas.height);
    };
    clear();
    context.lineCap = "round";
    context.lineJoin = "round";
    context.lineWidth = 20;
    context.strokeStyle = "#000";
    let drawing = false;
    let last = null;
    const point = (event) => {
      const box = canvas.getBoundingClientRect();
      return [
        ((event.clientX - box.left) * canvas.width) / box.width,
        ((event.clientY - box.top) * canvas.height) / box.height,
      ];
    };
    canvas.addEventListener("pointerdown", (event) => {
      // One finger or the main button draws; a second finger or a right click does not.
      if (!event.isPrimary || event.button !== 0) return;
      event.preventDefault();
      clearTimeout(predictionTimer);
      $("prediction-summary").dataset.status = "pending";
      canvas.setPointerCapture(event.pointerId);
      drawing = true;
      last = point(event);
      context.beginPath();
      context.moveTo(last[0], last[1]);
      context.lineTo(last[0] + 0.01, last[1]);
      context.stroke();
    });
    canvas.addEventListener("pointermove", (event) => {
      if (!drawing) return;
      const next = point(event);
      context.beginPath();
      context.moveTo(last[0], last[1]);
      context.lineTo(next[0], next[1]);
      context.stroke();
      last = next;
    });
    const end = () => {
      if (!drawing) return;
      drawing = false;
      schedulePrediction();
    };
    canvas.addEventListener("pointerup", end);
    canvas.addEventListener("pointercancel", end);
    $("clear-button").addEventListener("click", () => {
      clear();
      clearTimeout(predictionTimer);
      state.predictSeq += 1;
      state.prepared = null;
      state.lastSource = null;
      $("prediction-bars").replaceChildren();
      $("prediction-summary").textContent = "Draw a digit or upload an image.";
      delete $("prediction-summary").dataset.status;
      $("feature-maps").replaceChildren();
      showError("try-error", null);
    });
    $("upload-input").addEventListener("change", () => {
      const input = $("upload-input");
      const file = input.files[0];
      // Cleared, so that choosing the same file again predicts it again.
      input.value = "";
      if (file) predict(file, file.type || "application/octet-stream");
    });
    $("try-model").addEventListener("change", () => {
      if (state.lastSource) predict(state.lastSource.blob, state.lastSource.type);
    });
  }

  function schedulePrediction() {
    clearTimeout(predictionTimer);
    $("prediction-summary").dataset.status = "pending";
    predictionTimer = setTimeout(() => {
      $("draw-canvas").toBlob((blob) => {
        if (blob) predict(blob, "image/png");
      }, "image/png");
    }, 150);
  }

  async function predict(blob, type) {
    const model = $("try-model").value;
    if (!model) {
      showError("try-error", new Error("no model is ready to predict"));
      return;
    }
    const seq = ++state.predictSeq;
    state.lastSource = { blob, type };
    const summary = $("prediction-summary");
    summary.dataset.status = "working";
    try {
      const started = performance.now();
      const prepared = await api(`../v1/convserve/prepare_image?model=${enc(model)}`, {
        method: "POST",
        body: blob,
        contentType: type,
      });
      if (seq !== state.predictSeq) return;
      state.prepared = prepared;
      drawPrepared(prepared);
      const result = await api(`../v1/models/${enc(prepared.model_name)}/versions/${prepared.model_version}:predict`, {
        method: "POST",
        json: { signature_name: "predict_uint8", instances: [prepared.image] },
      });
      if (seq !== state.predictSeq) return;
      const elapsed = performance.now() - started;
      const meta = await metadataOf(prepared.model_name, prepared.model_version).catch(() => null);
      if (seq !== state.predictSeq) return;
      renderPrediction(result.predictions[0], meta, prepared, elapsed);
      showError("try-error", null);
      summary.dataset.status = "done";
      if ($("conv-source").value === "digit") runConvolve();
      await showFeatureMaps(prepared, seq);
    } catch (error) {
      if (seq !== state.predictSeq) return;
      summary.dataset.status = "failed";
      showError("try-error", error);
    }
  }

  function drawPrepared(prepared) {
    const [height, width] = prepared.shape;
    const canvas = $("prepared-canvas");
    canvas.width = width;
    canvas.height = height;
    const scale = Math.max(1, Math.floor(112 / Math.max(width, height)));
    canvas.style.width = `${width * scale}px`;
    canvas.style.height = `${height * scale}px`;
    const image = canvas.getContext("2d").createImageData(width, height);
    let i = 0;
    for (const row of prepared.image) {
      for (const pixel of row) {
        const gray = pixel[0];
        image.data[i] = image.data[i + 1] = image.data[i + 2] = gray;
        image.data[i + 3] = 255;
        i += 4;
      }
    }
    canvas.getContext("2d").putImageData(image, 0, 0);
  }

  function renderPrediction(probabilities, meta, prepared, elapsedMs) {
    const names = meta && meta.class_names && meta.class_names.length ? meta.class_names : null;
    const order = probabilities.map((p, i) => [p, i]).sort((a, b) => b[0] - a[0]).slice(0, TOP_CLASSES);
    const list = $("prediction-bars");
    list.replaceChildren(
      ...order.map(([p, i]) => {
        const label = names ? names[i] : String(i);
        const fill = el("span");
        fill.style.width = `${Math.max(0, Math.min(1, p)) * 100}%`;
        const item = el("li", { data: { classIndex: i, label, probability: p } }, [
          el("span", { text: label }),
          el("span", { className: "bar" }, [fill]),
          el("span", { className: "value", text: `${(p * 100).toFixed(2)} %` }),
        ]);
        item.title = String(p);
        return item;
      }),
    );
    const [bestP, best] = order[0];
    const summary = $("prediction-summary");
    summary.textContent =
      `${names ? names[best] : best} (${(bestP * 100).toFixed(2)} %) from ${prepared.model_name} ` +
      `v${prepared.model_version} in ${Math.round(elapsedMs)} ms`;
    summary.dataset.elapsedMs = String(elapsedMs);
  }

  // An array of any rank with leading 1s -> the [H][W][C] array inside it.
  function image3d(value) {
    let v = value;
    while (Array.isArray(v) && v.length === 1 && Array.isArray(v[0]) && Array.isArray(v[0][0]) && Array.isArray(v[0][0][0])) v = v[0];
    return v;
  }

  async function showFeatureMaps(prepared, seq) {
    const note = $("feature-maps-note");
    const box = $("feature-maps");
    try {
      const result = await api("../v1/convserve/feature_maps", {
        method: "POST",
        json: { model_spec: { name: prepared.model_name, version: prepared.model_version }, image: prepared.image },
      });
      if (seq !== state.predictSeq) return;
      box.replaceChildren(...result.feature_maps.map((layer) => layerMaps(layer)));
      note.textContent = "Each convolution layer's outputs for the prepared image, each map scaled to its own range.";
    } catch (error) {
      if (seq !== state.predictSeq) return;
      box.replaceChildren();
      note.textContent =
        error instanceof ApiError && error.status !== 401 ? `No feature maps: ${error.message}` : "";
    }
  }

  function layerMaps(layer) {
    const maps = image3d(layer.activations);
    const height = maps.length;
    const width = height ? maps[0].length : 0;
    const channels = width ? maps[0][0].length : 0;
    const shown = Math.min(channels, MAX_MAPS_PER_LAYER);
    const grid = el("div", { className: "maps" });
    for (let c = 0; c < shown; c += 1) {
      const plane = maps.map((row) => row.map((pixel) => pixel[c]));
      const canvas = el("canvas", { data: { channel: c } });
      drawGrid(canvas, plane, 1);
      canvas.style.width = "40px";
      canvas.style.height = "40px";
      canvas.title = `${layer.layer} channel ${c}`;
      grid.append(canvas);
    }
    const more = channels > shown ? ` (first ${shown} shown)` : "";
    return el("div", { className: "layer", data: { layer: layer.layer } }, [
      el("div", { className: "layer-name", text: `${layer.layer}: ${height}×${width}, ${channels} maps${more}` }),
      grid,
    ]);
  }

  // ---- Convolution ----------------------------------------------------------------

  // The teaching examples: a 6x8 image, white (1) at both sides and black (0) between,
  // whose vertical edges [1, -1] finds; and the 3x3 grid of corr2d's first example.
  const SEED = Array.from({ length: 6 }, () => [1, 1, 0, 0, 0, 0, 1, 1]);
  const CORR2D = [[0, 1, 2], [3, 4, 5], [6, 7, 8]];
  const PRESETS = {
    edge: "1 -1",
    "edge-t": "1\n-1",
    "sobel-x": "-1 0 1\n-2 0 2\n-1 0 1",
    "sobel-y": "-1 -2 -1\n0 0 0\n1 2 1",
    box: "1/9 1/9 1/9\n1/9 1/9 1/9\n1/9 1/9 1/9",
    identity: "0 0 0\n0 1 0\n0 0 0",
  };

  function parseNumber(token, where) {
    const parts = token.split("/");
    const numbers = parts.map((part) => (/^[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$/i.test(part) ? Number(part) : NaN));
    const value = parts.length === 1 ? numbers[0] : parts.length === 2 ? numbers[0] / numbers[1] : NaN;
    if (!Number.isFinite(value)) throw new Error(`${where}: a number or a fraction such as 1/9 expected, got "${token}"`);
    return value;
  }

  function parseKernel(text) {
    const trimmed = text.trim();
    let rows;
    if (trimmed.startsWith("[")) {
      let value;
      try {
        value = JSON.parse(trimmed);
      } catch {
        throw new Error("kernel: nested arrays such as [[1, -1]] or rows of numbers expected");
      }
      rows = (Array.isArray(value[0]) ? value : [value]).map((row, r) =>
        (Array.isArray(row) ? row : [row]).map((v, c) => parseNumber(String(v), `kernel row ${r + 1}, value ${c + 1}`)),
      );
    } else {
      rows = trimmed
        .split(/\n|;/)
        .map((line) => line.trim())
        .filter((line) => line)
        .map((line, r) => line.split(/[\s,]+/).map((token, c) => parseNumber(token, `kernel row ${r + 1}, value ${c + 1}`)));
    }
    if (!rows.length || !rows[0].length) throw new Error("kernel: at least one number expected");
    rows.forEach((row, r) => {
      if (row.length !== rows[0].length) {
        throw new Error(`kernel row ${r + 1}: ${rows[0].length} values expected (as in row 1), got ${row.length}`);
      }
    });
    return rows;
  }

  function wholeNumber(id, name) {
    const input = $(id);
    const value = Number(input.value);
    const low = Number(input.min);
    const high = Number(input.max);
    if (!Number.isInteger(value) || value < low || value > high) {
      throw new Error(`${name}: a whole number from ${low} to ${high} expected, got "${input.value}"`);
    }
    return value;
  }

  function convInput() {
    const source = $("conv-source").value;
    if (source === "seed") return SEED;
    if (source === "corr2d") return CORR2D;
    if (!state.prepared) throw new Error("input: draw or upload a digit in Try it first");
    return state.prepared.image.map((row) => row.map((pixel) => pixel[0] / 255));
  }

  function convOptions() {
    const stride = wholeNumber("conv-stride", "stride");
    const dilation = wholeNumber("conv-dilation", "dilation");
    return {
      strides: [stride, stride],
      dilations: [dilation, dilation],
      padding: $("conv-padding").value,
      mode: $("conv-flip").checked ? "CONVOLUTION" : "CROSS_CORRELATION",
    };
  }

  function showGrid(canvasId, numbersId, shapeId, grid, tableId) {
    drawGrid($(canvasId), grid, gridScale(grid));
    const rows = grid.length;
    const cols = rows ? grid[0].length : 0;
    $(shapeId).textContent = `${rows}×${cols}`;
    const box = $(numbersId);
    box.replaceChildren();
    if (rows <= MAX_NUMBER_GRID && cols <= MAX_NUMBER_GRID) box.append(numbersTable(grid, tableId));
  }

  async function runConvolve() {
    const button = $("convolve-button");
    // Only the newest request's answer is shown: an older one may arrive later.
    const seq = ++state.convSeq;
    button.dataset.status = "working";
    try {
      const input = convInput();
      const kernel = parseKernel($("kernel-input").value);
      const options = convOptions();
      showGrid("conv-input-canvas", "conv-input-numbers", "conv-input-shape", input, "conv-input-table");
      const result = await api("../v1/convserve/convolve", { method: "POST", json: { input, kernel, options } });
      if (seq !== state.convSeq) return null;
      showGrid("conv-output-canvas", "conv-output-numbers", "conv-output-shape", result.output, "conv-output-table");
      state.lastConv = { input, kernel, options, output: result.output };
      showError("conv-error", null);
      button.dataset.status = "done";
      return state.lastConv;
    } catch (error) {
      if (seq !== state.convSeq) return null;
      state.lastConv = null;
      showGrid("conv-output-canvas", "conv-output-numbers", "conv-output-shape", [], "conv-output-table");
      $("conv-output-shape").textContent = "";
      showError("conv-error", error);
      button.dataset.status = "failed";
      return null;
    }
  }

  async function learnKernel() {
    const button = $("fit-button");
    button.dataset.status = "working";
    try {
      const pair = await runConvolve();
      if (!pair) throw new Error("the example pair could not be made; see the error above");
      const result = await api("../v1/convserve/fit_kernel", {
        method: "POST",
        json: {
          inputs: pair.input,
          targets: pair.output,
          kernel_shape: [pair.kernel.length, pair.kernel[0].length],
          options: pair.options,
          learning_rate: stepSize(pair.input, pair.kernel),
          // Stop once the fit reproduces the targets to about 1e-5 (root mean square).
          tolerance: 1e-10,
          seed: 1,
        },
      });
      const learned = result.kernel;
      // Enough digits to see how close the fit came.
      $("fit-learned").replaceChildren(numbersTable(learned, "fit-learned-table", 6));
      $("fit-true").replaceChildren(numbersTable(pair.kernel, "fit-true-table"));
      drawLoss($("fit-loss"), result.loss);
      const final = result.loss[result.loss.length - 1];
      const summary = $("fit-summary");
      summary.textContent = `${result.steps} steps, stopped: ${result.stop_reason.replace("_", " ")}; final loss ${final.toExponential(2)}`;
      summary.dataset.finalLoss = String(final);
      $("fit-result").hidden = false;
      showError("fit-error", null);
      button.dataset.status = "done";
    } catch (error) {
      showError("fit-error", error);
      button.dataset.status = "failed";
    }
  }

  // A step size the squared error's curvature allows: its largest eigenvalue is at most
  // 2 * (kernel taps) * mean(x^2), and half its inverse descends fast without diverging,
  // whatever the scale of the input (the 0/1 image, the 0..8 grid or a digit).
  function stepSize(input, kernel) {
    let sum = 0;
    let count = 0;
    for (const row of input) for (const v of row) { sum += v * v; count += 1; }
    const taps = kernel.length * kernel[0].length;
    const curvature = 2 * taps * (sum / Math.max(count, 1));
    return curvature > 0 ? Math.min(1, 1 / curvature) : 0.03;
  }

  // A canvas's 2-D context drawn in CSS pixels at the screen's resolution, and its size.
  function sharpContext(canvas, fallbackWidth, fallbackHeight) {
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || fallbackWidth;
    const height = canvas.clientHeight || fallbackHeight;
    canvas.width = width * ratio;
    canvas.height = height * ratio;
    const context = canvas.getContext("2d");
    context.scale(ratio, ratio);
    return { context, width, height };
  }

  function drawLoss(canvas, loss) {
    const { context, width, height } = sharpContext(canvas, 260, 90);
    const logs = loss.map((v) => Math.log10(Math.max(v, 1e-12)));
    const low = Math.min(...logs);
    const high = Math.max(...logs);
    const span = high - low || 1;
    context.strokeStyle = "#1f4e79";
    context.lineWidth = 1.5;
    context.beginPath();
    logs.forEach((v, i) => {
      const x = 4 + ((width - 8) * i) / Math.max(logs.length - 1, 1);
      const y = 4 + ((height - 8) * (high - v)) / span;
      if (i === 0) context.moveTo(x, y);
      else context.lineTo(x, y);
    });
    context.stroke();
    context.fillStyle = "#5b6470";
    context.font = "10px system-ui, sans-serif";
    context.fillText(`${Number(loss[0].toPrecision(3))}`, 6, 12);
    context.fillText(`${loss[loss.length - 1].toExponential(1)}`, width - 50, height - 6);
  }

  function setUpConvolution() {
    for (const button of document.querySelectorAll("#kernel-presets button")) {
      button.addEventListener("click", () => {
        $("kernel-input").value = PRESETS[button.dataset.preset];
        runConvolve();
      });
    }
    $("convolve-button").addEventListener("click", () => runConvolve());
    $("conv-source").addEventListener("change", () => runConvolve());
    for (const id of ["conv-stride", "conv-dilation", "conv-padding", "conv-flip"]) {
      $(id).addEventListener("change", () => runConvolve());
    }
    $("fit-button").addEventListener("click", () => learnKernel());
  }

  // ---- Traffic --------------------------------------------------------------------

  const CHARTS = [
    { title: "requests/s", lines: [["requests_per_s", "#1f4e79", 1], ["errors_per_s", "#b3261e", 1]] },
    { title: "latency p50 / p99 (ms), all calls", lines: [["p50_s", "#1f4e79", 1000], ["p99_s", "#8a5a00", 1000]] },
    { title: "batch size (mean)", lines: [["batch_size", "#1e7b34", 1]] },
    { title: "queue depth (images)", lines: [["queue_depth", "#6b3fa0", 1]] },
  ];

  async function refreshTraffic() {
    try {
      const series = await api("../v1/convserve/traffic");
      renderTraffic(series);
      showError("traffic-error", null);
    } catch (error) {
      showError("traffic-error", error);
    }
  }

  function renderTraffic(series) {
    const box = $("traffic-charts");
    const times = series.time;
    const span = times.length > 1 ? times[times.length - 1] - times[0] : 0;
    $("traffic-span").textContent = span >= 120 ? `${Math.round(span / 60)} min` : `${Math.round(span)} s`;
    // Models first; the requests that name none (convolutions, fits, lists) last.
    const models = series.models
      .filter((m) => m.requests_per_s.some((v) => v > 0) || m.model)
      .sort((a, b) => (a.model === "") - (b.model === ""));
    if (!models.length) {
      box.replaceChildren(el("p", { className: "muted", text: "No requests yet." }));
      return;
    }
    box.replaceChildren(
      ...models.map((model) => {
        const charts = CHARTS.map((chart) => {
          const canvas = el("canvas");
          const latest = chart.lines
            .map(([key, , scale]) => {
              const values = model[key];
              const last = values.length ? values[values.length - 1] : null;
              return last === null || last === undefined ? "–" : formatNumber(last * scale);
            })
            .join(" / ");
          const wrap = el("div", { className: "chart", data: { chart: chart.title } }, [
            el("span", { text: `${chart.title}: ${latest}` }),
            canvas,
          ]);
          wrap.lines = chart.lines.map(([key, color, scale]) => [model[key], color, scale]);
          return wrap;
        });
        const name = model.model || "(no model: convolve, fit kernel, lists)";
        return el("div", { className: "traffic-model", data: { model: model.model } }, [
          el("h3", { text: name }),
          el("div", { className: "charts" }, charts),
        ]);
      }),
    );
    // Drawn once in the page, where the canvases have their laid-out size.
    for (const wrap of box.querySelectorAll(".chart")) drawLines(wrap.querySelector("canvas"), wrap.lines);
  }

  function drawLines(canvas, lines) {
    const { context, width, height } = sharpContext(canvas, 200, 64);
    let high = 0;
    let count = 0;
    for (const [values, , scale] of lines) {
      count = Math.max(count, values.length);
      for (const v of values) if (v !== null) high = Math.max(high, v * scale);
    }
    if (high <= 0) high = 1;
    for (const [values, color, scale] of lines) {
      context.strokeStyle = color;
      context.fillStyle = color;
      context.lineWidth = 1.5;
      context.beginPath();
      let drawing = false;
      values.forEach((v, i) => {
        if (v === null) {
          drawing = false;
          return;
        }
        const x = 2 + ((width - 4) * i) / Math.max(count - 1, 1);
        const y = height - 3 - ((height - 8) * v * scale) / high;
        if (drawing) {
          context.lineTo(x, y);
        } else {
          context.moveTo(x, y);
          // A value between two gaps has no line to be part of: mark it.
          if (values[i + 1] === null || values[i + 1] === undefined) context.fillRect(x - 1.5, y - 1.5, 3, 3);
        }
        drawing = true;
      });
      context.stroke();
    }
    context.fillStyle = "#5b6470";
    context.font = "9px system-ui, sans-serif";
    context.fillText(formatNumber(high), 3, 10);
  }

  // ---- Start ----------------------------------------------------------------------

  let firstRefresh = true;
  async function refreshNow() {
    clearTimeout(state.pollTimer);
    // A tab nobody looks at does not poll; it catches up when shown again.
    if (document.hidden) return;
    if (!needsToken()) {
      await Promise.all([refreshModels(), refreshTraffic()]);
      // The first convolution, once the server has answered (with an accepted token).
      if (firstRefresh && state.refreshes > 0) {
        firstRefresh = false;
        runConvolve();
      }
    }
    clearTimeout(state.pollTimer);
    state.pollTimer = setTimeout(refreshNow, state.config.poll_interval_s * 1000);
  }

  async function start() {
    setUpToken();
    setUpDrawing();
    setUpConvolution();
    try {
      const response = await fetch("config.json", { cache: "no-store" });
      if (response.ok) state.config = { ...state.config, ...(await response.json()) };
    } catch {
      // The defaults serve; the first data call says whether the server answers.
    }
    const poll = Number(state.config.poll_interval_s);
    state.config.poll_interval_s = Number.isFinite(poll) ? Math.max(0.5, poll) : 2;
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) refreshNow();
    });
    $("poll-interval").textContent = String(state.config.poll_interval_s);
    $("traffic-interval").textContent = String(state.config.traffic_interval_s);
    $("token-button").hidden = !state.config.token_required;
    if (needsToken()) askToken("");
    refreshNow();
  }

  start();
})();
