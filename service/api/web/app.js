// fisher-guard's web page: plain JavaScript over the service's own HTTP API (the same endpoints any client calls).
"use strict";

const KEY_STORAGE = "fisher-guard-api-key";
const DIGITS_SHOWN = 20;
const EIGENVECTORS_SHOWN = 5;
const JOB_POLL_MS = 1500;
const NOT_READY_RETRY_MS = 2000;
const SVG_NS = "http://www.w3.org/2000/svg";

const state = {
  key: sessionStorage.getItem(KEY_STORAGE) || "",
  models: [],
  model: null,       // the chosen model's info (GET /v1/models)
  image: null,       // {blob, name, url, resize, description}
  digitUrls: [],
  jobsTimer: null,
};

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, code, detail) {
    super(detail);
    this.status = status;
    this.code = code;
  }
}

// ---- HTTP ----

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.key) headers.set("X-API-Key", state.key);
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let code = `http_${response.status}`;
    let detail = `${response.status} ${response.statusText}`;
    try {
      const problem = await response.json();  // the API's errors are RFC 9457 problem documents
      code = problem.code || code;
      detail = problem.detail || detail;
    } catch (ignored) { /* not JSON: keep the status line */ }
    throw new ApiError(response.status, code, detail);
  }
  return response;
}

const getJSON = async (path) => (await api(path)).json();

const postJSON = async (path, body) => (await api(path, {
  method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
})).json();

async function postForm(path, fields) {
  const form = new FormData();
  form.append("files", state.image.blob, state.image.name);
  for (const [name, value] of Object.entries(fields)) form.append(name, String(value));
  if (state.image.resize) form.append("resize", "true");
  return (await api(path, { method: "POST", body: form })).json();
}

const modelPath = (what) => `/v1/models/${encodeURIComponent(state.model.name)}/${what}`;

// ---- messages ----

function say(text, kind = "error") {
  const box = $("message");
  box.textContent = text;
  box.className = kind;
  box.hidden = !text;
}

function describe(error) {
  if (error instanceof ApiError) {
    if (error.status === 401) return "The API key was refused (or none was given): paste a valid key above.";
    return `${error.detail} (${error.code})`;
  }
  return `The service could not be reached: ${error.message}`;
}

// ---- small DOM helpers ----

function facts(list, pairs) {
  list.replaceChildren();
  for (const [term, value] of pairs) {
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = value;
    list.append(dt, dd);
  }
}

const pngUrl = (base64) => `data:image/png;base64,${base64}`;
const fixed = (value, digits = 4) => Number(value).toFixed(digits);

function showVerdict(element, item, threshold) {
  element.textContent = `${item.adversarial ? "adversarial" : "clean"}: score ${fixed(item.score)} ` +
    `(threshold ${fixed(threshold)})`;
  element.className = `verdict ${item.adversarial ? "adversarial" : "clean"}`;
  element.dataset.adversarial = String(item.adversarial);
  element.dataset.score = String(item.score);
  element.dataset.prediction = String(item.prediction);
}

function sizeOf(blob) {
  return createImageBitmap(blob).then((bitmap) => {
    const size = { width: bitmap.width, height: bitmap.height };
    bitmap.close();
    return size;
  }, () => null);  // the browser cannot decode it: the server will say what is wrong with it
}

// ---- start: models, digits, jobs ----

async function needsKey() {
  // the schema shows security schemes only when the server has API keys configured
  const schema = await (await fetch("/openapi.json")).json();
  return Object.keys((schema.components || {}).securitySchemes || {}).length > 0;
}

async function connect() {
  let models;
  try {
    ({ models } = await getJSON("/v1/models"));
  } catch (error) {
    if (error instanceof ApiError && error.status === 503 && error.code === "not_ready") {
      say("The models are still loading; trying again in a moment.", "info");
      setTimeout(connect, NOT_READY_RETRY_MS);
    } else {
      say(describe(error));
    }
    return;
  }
  say("");
  state.models = models;
  const select = $("model");
  select.replaceChildren(...models.map((model) => {
    const option = document.createElement("option");
    option.value = model.name;
    option.textContent = model.detector ? model.name : `${model.name} (no detector)`;
    return option;
  }));
  const first = models.find((model) => model.detector) || models[0];
  if (!first) {
    say("The server serves no model.");
    return;
  }
  select.value = first.name;
  select.disabled = false;
  state.model = first;
  $("submit-job").disabled = false;
  $("refresh-jobs").disabled = false;
  await Promise.all([loadDigits(), refreshJobs()]);
}

async function loadDigits() {
  const holder = $("digits");
  try {
    const samples = await getJSON("/v1/samples");
    const count = Math.min(DIGITS_SHOWN, samples.count);
    const blobs = await Promise.all([...Array(count).keys()].map(async (index) =>
      (await api(`/v1/samples/${index}`)).blob()));
    state.digitUrls.forEach((url) => URL.revokeObjectURL(url));
    state.digitUrls = blobs.map((blob) => URL.createObjectURL(blob));
    holder.replaceChildren(...blobs.map((blob, index) => {
      const label = samples.class_names[samples.labels[index]];
      const button = document.createElement("button");
      button.type = "button";
      button.title = `test digit ${index} (a ${label})`;
      button.dataset.index = String(index);
      const img = document.createElement("img");
      img.className = "pixel";
      img.alt = `digit ${label}`;
      img.src = state.digitUrls[index];
      button.append(img);
      button.addEventListener("click", () => {
        holder.querySelectorAll("button").forEach((b) => b.classList.toggle("selected", b === button));
        choose(blob, `digit-${index}.png`, `bundled test digit ${index} (true class ${label})`);
      });
      return button;
    }));
  } catch (error) {
    holder.textContent = `The bundled digits could not be loaded: ${describe(error)}`;
  }
}

// ---- an image: screen and spectrum ----

async function choose(blob, fileName, description) {
  if (state.image) URL.revokeObjectURL(state.image.url);
  const url = URL.createObjectURL(blob);
  const [, height, width] = state.model.input_shape;
  const size = await sizeOf(blob);
  const resize = size !== null && (size.width !== width || size.height !== height);
  state.image = { blob, name: fileName, url, resize, description };
  $("chosen").hidden = false;
  $("chosen-image").src = url;
  $("chosen-name").textContent = description + (resize ? ` — ${size.width}x${size.height}, resized by the ` +
    `server to the model's ${width}x${height}` : "");
  $("attack-result").hidden = true;
  $("attack-facts").replaceChildren();
  $("attack-verdict").replaceChildren();
  $("attack").hidden = false;
  await Promise.all([screen(), spectrum()]);
}

async function screen() {
  const section = $("screen");
  section.hidden = false;
  const verdict = $("verdict");
  verdict.className = "verdict";
  verdict.textContent = "screening…";
  delete verdict.dataset.adversarial;
  $("screen-facts").replaceChildren();
  try {
    const answer = await postForm(modelPath("screen/upload"), {});
    const item = answer.results[0];
    showVerdict(verdict, item, answer.threshold);
    facts($("screen-facts"), [
      ["prediction", `${item.class_name} (probability ${fixed(item.probability, 3)})`],
      ["threshold", `${fixed(answer.threshold)} (${answer.threshold_source})`],
      ["detector", `${answer.detector_id} (AUC ${answer.detector_auc === null ? "n/a" : fixed(answer.detector_auc, 3)})`],
      ["method", answer.method],
      ...(answer.notes.length ? [["notes", answer.notes.join("; ")]] : []),
    ]);
  } catch (error) {
    verdict.textContent = describe(error);
  }
}

async function spectrum() {
  const section = $("spectrum");
  section.hidden = false;
  const chart = $("eigen-chart");
  const vectors = $("eigenvectors");
  chart.replaceChildren();
  vectors.replaceChildren();
  const k = Math.min(10, state.model.num_classes);
  try {
    const answer = await postForm(modelPath("spectrum/upload"), { k, vectors: "png" });
    const item = answer.results[0];
    drawEigenvalues(chart, item.eigenvalues);
    vectors.replaceChildren(...(item.eigenvectors_png || []).slice(0, EIGENVECTORS_SHOWN).map((png, i) => {
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.className = "pixel eigenvector";
      img.alt = `eigenvector ${i + 1}`;
      img.src = pngUrl(png);
      const caption = document.createElement("figcaption");
      caption.textContent = `v${i + 1}, λ = ${item.eigenvalues[i].toPrecision(3)}`;
      figure.append(img, caption);
      return figure;
    }));
  } catch (error) {
    vectors.textContent = describe(error);
  }
}

function svg(name, attributes, text) {
  const element = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
  if (text !== undefined) element.textContent = text;
  return element;
}

function drawEigenvalues(chart, values) {
  // a bar per eigenvalue on a log10 axis, one grid line per decade; zeros (past the rank K-1) get no bar
  const width = Math.max(chart.clientWidth, 320);
  const height = 220;
  const pad = { left: 52, right: 8, top: 10, bottom: 26 };
  chart.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const positive = values.filter((v) => v > 0);
  if (!positive.length) {
    chart.append(svg("text", { x: pad.left, y: height / 2 }, "every eigenvalue is 0"));
    return;
  }
  const low = Math.floor(Math.log10(Math.min(...positive)));
  const high = Math.max(Math.ceil(Math.log10(Math.max(...positive))), low + 1);
  const plotHeight = height - pad.top - pad.bottom;
  const y = (v) => pad.top + ((high - Math.log10(v)) / (high - low)) * plotHeight;
  for (let decade = low; decade <= high; decade += 1) {
    const at = y(10 ** decade);
    chart.append(svg("line", { class: "grid", x1: pad.left, x2: width - pad.right, y1: at, y2: at }));
    chart.append(svg("text", { x: pad.left - 6, y: at + 4, "text-anchor": "end" }, `1e${decade}`));
  }
  const slot = (width - pad.left - pad.right) / values.length;
  const baseline = pad.top + plotHeight;
  values.forEach((value, i) => {
    const x = pad.left + i * slot;
    if (value > 0) {
      const top = y(value);
      const bar = svg("rect", { class: "bar", x: x + slot * 0.15, y: top, width: slot * 0.7,
        height: baseline - top });
      bar.append(svg("title", {}, `λ${i + 1} = ${value.toPrecision(4)}`));
      chart.append(bar);
    }
    chart.append(svg("text", { x: x + slot / 2, y: height - 8, "text-anchor": "middle" }, `λ${i + 1}`));
  });
  chart.append(svg("line", { class: "axis", x1: pad.left, x2: pad.left, y1: pad.top, y2: baseline }));
  chart.dataset.bars = String(positive.length);
}

// ---- OSSA ----

async function craft(event) {
  event.preventDefault();
  if (!state.image) return;
  const button = $("craft");
  const epsilon = Number($("epsilon").value);
  button.disabled = true;
  const verdict = $("attack-verdict");
  verdict.className = "verdict";
  verdict.textContent = "attacking…";
  delete verdict.dataset.adversarial;
  try {
    const answer = await postForm(modelPath("attack/upload"), { attack: "ossa", epsilon, output: "png" });
    const item = answer.results[0];
    const names = state.model.class_names;
    $("attack-original").src = state.image.url;
    $("attack-perturbation").src = pngUrl(item.perturbation_png);
    $("attack-adversarial").src = pngUrl(item.adversarial_png);
    $("attack-result").hidden = false;
    facts($("attack-facts"), [
      ["prediction", `${names[item.original_prediction]} → ${names[item.adversarial_prediction]}`],
      ["fooled", item.fooled ? "yes" : "no"],
      ["perturbation L2", fixed(item.perturbation_norm)],
      ["top eigenvalue", Number(item.top_eigenvalue).toPrecision(4)],
    ]);
    // the adversarial image's own screen: the 8-bit PNG shown, as anyone would send it
    const screened = await postJSON(modelPath("screen"), { images: [item.adversarial_png] });
    showVerdict(verdict, screened.results[0], screened.threshold);
    verdict.textContent = `screen of the adversarial image: ${verdict.textContent}`;
  } catch (error) {
    verdict.textContent = describe(error);
  } finally {
    button.disabled = false;
  }
}

// ---- jobs ----

async function refreshJobs() {
  clearTimeout(state.jobsTimer);
  const message = $("jobs-message");
  try {
    const { jobs } = await getJSON("/v1/jobs?limit=20");
    message.textContent = jobs.length ? "" : "no jobs yet";
    $("job-rows").replaceChildren(...jobs.map(jobRow));
    if (jobs.some((job) => job.status === "queued" || job.status === "running")) {
      state.jobsTimer = setTimeout(refreshJobs, JOB_POLL_MS);
    }
  } catch (error) {
    message.textContent = describe(error);
  }
}

function jobRow(job) {
  const row = document.createElement("tr");
  row.dataset.jobId = job.id;
  row.dataset.status = job.status;
  const cell = (text, className) => {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    return td;
  };
  const progress = document.createElement("td");
  const bar = document.createElement("progress");
  bar.max = Math.max(job.progress.total, 1);
  bar.value = job.progress.done;
  progress.append(bar, ` ${job.progress.done}/${job.progress.total}`);
  const status = cell(job.error ? `${job.status}: ${job.error.reason}` : job.status, `status-${job.status}`);
  row.append(cell(job.id.slice(0, 12), "id"), cell(job.type), cell(job.model || ""), status, progress,
    cell(new Date(job.created_at * 1000).toLocaleTimeString()));
  return row;
}

async function submitJob() {
  const message = $("jobs-message");
  try {
    const job = await postJSON("/v1/jobs", { type: "screen", model: state.model.name, dataset: "mnist:test",
      limit: 50 });
    message.textContent = `submitted ${job.id.slice(0, 12)}`;
  } catch (error) {
    message.textContent = describe(error);
  }
  await refreshJobs();
}

// ---- wiring ----

async function start() {
  $("epsilon").addEventListener("input", () => {
    $("epsilon-value").textContent = Number($("epsilon").value).toFixed(1);
  });
  $("attack-form").addEventListener("submit", craft);
  $("upload").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (!file || !state.model) return;
    $("digits").querySelectorAll("button").forEach((b) => b.classList.remove("selected"));
    choose(file, file.name, `uploaded ${file.name}`);
  });
  $("model").addEventListener("change", () => {
    state.model = state.models.find((model) => model.name === $("model").value);
    if (state.image) choose(state.image.blob, state.image.name, state.image.description);
  });
  $("submit-job").addEventListener("click", submitJob);
  $("refresh-jobs").addEventListener("click", refreshJobs);
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("api-key").value.trim();
    sessionStorage.setItem(KEY_STORAGE, state.key);
    connect();
  });
  try {
    if (await needsKey()) {
      $("key-form").hidden = false;
      $("api-key").value = state.key;
      if (!state.key) {
        say("This server needs an API key: paste one above.", "info");
        return;
      }
    }
  } catch (error) {
    say(`The service could not be reached: ${error.message}`);
    return;
  }
  await connect();
}

document.addEventListener("DOMContentLoaded", start);
