// The inspection page: plain JS, no build step, no CDN (it works offline).
// Every image -- dropped, picked, or fetched for ?try=PATH -- goes through upload(), the one path to POST /predict.
"use strict";

const RECENT = 20;
const state = {
  token: sessionStorage.getItem("anomalyclip-token") || "",
  thresholds: null,     // GET /thresholds
  local: null,          // {image, pixel}: slider values applied in this page only (thresholds not persisted)
  results: [],          // {prediction, element}
};

function $(id) { return document.getElementById(id); }

function setStatus(text, isError) {
  const status = $("status");
  status.textContent = text;
  status.className = isError ? "error" : "";
}

async function api(path, options) {
  options = options || {};
  const headers = Object.assign({}, options.headers || {});
  if (state.token) headers["Authorization"] = "Bearer " + state.token;
  const response = await fetch(path, Object.assign({}, options, {headers: headers}));
  let body = null;
  try { body = await response.json(); } catch (error) { body = null; }
  if (response.status === 401) $("token-box").hidden = false;
  if (!response.ok) throw new Error((body && body.error) || ("HTTP " + response.status));
  return body;
}

// The one upload path: dropped files, picked files and ?try= images all come here.
async function upload(files) {
  files = Array.from(files);
  if (!files.length) return;
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  setStatus("scoring " + files.length + " image(s)…");
  try {
    const body = await api("/predict?overlay=1", {method: "POST", body: form});
    for (const prediction of body.predictions) addResult(prediction);
    setStatus("scored " + body.predictions.length + " image(s)");
  } catch (error) {
    setStatus("error: " + error.message, true);
  }
}

function currentThresholds(prediction) {
  if (state.local) return {image: state.local.image, pixel: state.local.pixel, local: true};
  return {image: prediction.thresholds.image_threshold, pixel: prediction.thresholds.pixel_threshold, local: false};
}

function verdictOf(prediction) {
  const t = currentThresholds(prediction);
  if (t.image === null || t.image === undefined || prediction.score === null) return "unknown";
  return prediction.score >= t.image ? "anomalous" : "normal";
}

function fillCard(element, prediction) {
  const verdict = verdictOf(prediction);
  const t = currentThresholds(prediction);
  element.dataset.verdict = verdict;
  element.querySelector(".verdict").textContent = verdict === "unknown" ? "no threshold" : verdict;
  element.querySelector(".verdict").className = "verdict " + verdict;
  element.querySelector(".score").textContent = prediction.score === null ? "–" : prediction.score.toFixed(4);
  let area = "–";
  if (prediction.defect_pixels !== null) {
    const share = 100 * prediction.defect_pixels / (prediction.width * prediction.height);
    area = prediction.defect_pixels + " px (" + share.toFixed(1) + " %)";
    if (t.local) area += " at the service's pixel threshold";
  }
  element.querySelector(".area").textContent = area;
}

function addResult(prediction) {
  const card = document.createElement("article");
  card.className = "result";
  card.innerHTML = '<img class="overlay" alt="overlay"><div class="name"></div>' +
    '<div>verdict <span class="verdict"></span></div><div>score <span class="score"></span></div>' +
    '<div>defect area <span class="area"></span></div>';
  card.querySelector(".overlay").src = "data:image/png;base64," + prediction.overlay_png;
  card.querySelector(".name").textContent = prediction.file;
  fillCard(card, prediction);
  $("results").prepend(card);
  state.results.push({prediction: prediction, element: card});
  const item = document.createElement("li");
  item.textContent = new Date().toLocaleTimeString() + " " + prediction.file + ": " + verdictOf(prediction) +
    (prediction.score === null ? "" : " (" + prediction.score.toFixed(3) + ")");
  $("recent").prepend(item);
  while ($("recent").children.length > RECENT) $("recent").lastChild.remove();
}

function showThresholds(document_) {
  state.thresholds = document_;
  for (const [key, id] of [["image_threshold", "image-threshold"], ["pixel_threshold", "pixel-threshold"]]) {
    const slider = $(id);
    const range = document_.ranges[key];
    slider.min = range[0];
    slider.max = range[1];
    slider.step = (range[1] - range[0]) / 1000;
    const value = document_[key];
    slider.disabled = false;
    if (value !== null) slider.value = value;
    $(id + "-value").textContent = value === null ? "none" : Number(value).toFixed(4);
  }
  $("threshold-mode").textContent = document_.persisted ?
    "moving a slider changes the service's thresholds (saved to " + document_.file + ")" :
    "moving a slider changes the verdicts on this page only";
}

async function thresholdsMoved() {
  const image = Number($("image-threshold").value);
  const pixel = Number($("pixel-threshold").value);
  $("image-threshold-value").textContent = image.toFixed(4);
  $("pixel-threshold-value").textContent = pixel.toFixed(4);
  if (state.thresholds && state.thresholds.persisted) {
    try {
      const body = await api("/thresholds", {method: "PUT", headers: {"Content-Type": "application/json"},
                                            body: JSON.stringify({image_threshold: image, pixel_threshold: pixel})});
      showThresholds(body);
      setStatus("thresholds saved; new images are judged with them");
    } catch (error) {
      setStatus("error: " + error.message, true);
    }
    return;
  }
  state.local = {image: image, pixel: pixel};
  for (const result of state.results) fillCard(result.element, result.prediction);
}

async function loadInfo() {
  try {
    const model = await api("/model");
    $("model-info").textContent = "model " + model.model_id + " · " + model.runtime + " · " + model.image_size + " px";
    showThresholds(model.thresholds);
  } catch (error) {
    setStatus("error: " + error.message, true);
  }
}

// ?try=PATH (repeatable): fetch images of this site (the demo's /sample.png, /sample-good.png) and send them
// through upload(), as dropped files are (headless browsers cannot pick files in a dialog).
async function tryParameter() {
  const paths = new URLSearchParams(location.search).getAll("try");
  const files = [];
  for (const path of paths) {
    const url = new URL(path, location.href);
    if (url.origin !== location.origin) { setStatus("error: ?try= takes a path on this site", true); return; }
    const response = await fetch(url);
    if (!response.ok) { setStatus("error: cannot fetch " + path + " (HTTP " + response.status + ")", true); return; }
    const blob = await response.blob();
    files.push(new File([blob], url.pathname.split("/").pop() || "image", {type: blob.type}));
  }
  await upload(files);
}

function wire() {
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    upload(event.dataTransfer.files);
  });
  $("picker").addEventListener("change", (event) => { upload(event.target.files); event.target.value = ""; });
  $("image-threshold").addEventListener("change", thresholdsMoved);
  $("pixel-threshold").addEventListener("change", thresholdsMoved);
  $("token-use").addEventListener("click", () => {
    state.token = $("token").value;
    sessionStorage.setItem("anomalyclip-token", state.token);
    $("token-box").hidden = true;
    loadInfo();
  });
}

wire();
loadInfo().then(tryParameter);
