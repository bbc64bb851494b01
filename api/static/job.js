/* Job page: progress while it runs, summary chart, result cards with thumbnails, exports. */
"use strict";

(function () {
  const C = window.Console;
  const POLL_SECONDS = 1;
  /** While running, results are reloaded every this many polls (summary: every poll). */
  const RESULTS_EVERY = 5;
  /** Cards kept in the page; the exports hold everything. */
  const MAX_RESULTS = 5000;
  const PAGE_CARDS = 120;
  const THUMBNAIL_CONCURRENCY = 6;

  let jobId = "";
  let emotions = [];
  let results = [];
  let resultsTotal = 0;
  let shown = PAGE_CARDS;
  let polls = 0;
  let stopPolling = null;

  // -- job status -----------------------------------------------------------------------------

  function fact(list, term, value) {
    list.append(C.el("dt", {}, term), C.el("dd", {}, value));
  }

  function renderJob(job) {
    const status = document.getElementById("job-status");
    status.className = "badge badge-" + job.status;
    status.textContent = job.status.replaceAll("_", " ");
    const processed = job.done + job.failed;
    const text =
      Math.round(job.progress * 100) + "% · " + processed + " of " + job.total + " images" +
      (job.failed ? " (" + job.failed + " failed)" : "");
    C.setProgress(document.getElementById("job-progress"), job.progress, text);
    document.getElementById("job-progress-text").textContent = text;

    const facts = document.getElementById("job-facts");
    facts.replaceChildren();
    fact(facts, "Source", job.source_type + ": " + job.source);
    fact(facts, "Batch size", job.batch_size);
    fact(facts, "Model versions", job.model_versions.length ? job.model_versions.join(", ") : "–");
    fact(facts, "Created", C.when(job.created_at));
    fact(facts, "Finished", C.when(job.finished_at));
    fact(facts, "Duration", job.duration_seconds === null ? "–" : job.duration_seconds + " s");
    fact(
      facts,
      "Throughput",
      job.images_per_second === null ? "–" : job.images_per_second + " images/s",
    );
    if (job.error) fact(facts, "Error", job.error);
    document.getElementById("job-cancel").hidden = C.TERMINAL.has(job.status);
  }

  async function refresh() {
    const job = await C.getJSON("/api/v1/jobs/" + jobId);
    renderJob(job);
    const finished = C.TERMINAL.has(job.status);
    polls += 1;
    await loadSummary();
    if (finished || polls % RESULTS_EVERY === 1) await loadResults();
    if (finished) C.announce("Job " + job.status.replaceAll("_", " ") + ".");
    return !finished;
  }

  async function cancel() {
    const button = document.getElementById("job-cancel");
    button.disabled = true;
    try {
      await C.request("/api/v1/jobs/" + jobId, { method: "DELETE" });
      C.announce("Job cancelled.");
    } catch (err) {
      C.showError(err);
    } finally {
      button.disabled = false;
    }
    startPolling();
  }

  // -- summary chart --------------------------------------------------------------------------

  async function loadSummary() {
    const summary = await C.getJSON("/api/v1/jobs/" + jobId + "/summary");
    const chart = document.getElementById("summary-chart");
    const rows = emotions.map((name) => ({
      name,
      count: summary.emotions[name] ? summary.emotions[name].count : 0,
      mean: summary.emotions[name] ? summary.emotions[name].mean_confidence : null,
    }));
    if (summary.failed) rows.push({ name: "Errors", count: summary.failed, mean: null, error: true });
    const processed = summary.done + summary.failed;
    const largest = Math.max(1, ...rows.map((row) => row.count));
    const list = C.el("ul", { class: "bars" });
    for (const row of rows) {
      const share = processed ? row.count / processed : 0;
      const fill = C.el("span", { class: "bar-fill" + (row.error ? " bar-error" : "") });
      fill.style.width = (row.count / largest) * 100 + "%"; // CSSOM: allowed by the CSP
      const value =
        row.count + " (" + C.percent(share) + ")" +
        (row.mean === null || !row.count ? "" : " · mean confidence " + C.number(row.mean, 2));
      list.append(
        C.el(
          "li",
          { class: "bar-row", "data-emotion": row.name },
          C.el("span", { class: "bar-label" }, row.name),
          C.el("span", { class: "bar-track", "aria-hidden": "true" }, fill),
          C.el("span", { class: "bar-value" }, value),
        ),
      );
    }
    chart.replaceChildren(list);
    const faces = summary.faces;
    const searched = summary.done - faces.not_searched;
    document.getElementById("summary-faces").textContent = searched
      ? faces.faces + " face(s) found in " + (searched - faces.images_without_face) +
        " image(s) · " + faces.images_without_face + " image(s) without a face (classified " +
        "whole) · " + faces.images_with_several_faces + " with several faces"
      : faces.not_searched
        ? "Face detection was off for this job: whole images were classified."
        : "";
  }

  // -- results --------------------------------------------------------------------------------

  async function loadResults() {
    const items = [];
    let total = 0;
    for (let page = 1; items.length < MAX_RESULTS; page += 1) {
      const body = await C.getJSON(
        "/api/v1/jobs/" + jobId + "/results?format=json&limit=1000&page=" + page,
      );
      total = body.total;
      body.items.forEach((item, index) => {
        item.position = items.length + index;
      });
      items.push(...body.items);
      if (!body.items.length || items.length >= total) break;
    }
    results = items.slice(0, MAX_RESULTS);
    resultsTotal = total;
    renderResults();
  }

  function visibleResults() {
    const filter = document.getElementById("filter-emotion").value;
    const order = document.getElementById("sort-order").value;
    let list = results;
    if (filter === "__errors__") list = list.filter((r) => r.status !== "succeeded");
    else if (filter === "__noface__") list = list.filter((r) => r.faces_found === 0);
    else if (filter === "__several__") list = list.filter((r) => r.faces_found > 1);
    else if (filter) list = list.filter((r) => r.predicted_emotion === filter);
    list = list.slice();
    if (order === "asc" || order === "desc") {
      const sign = order === "asc" ? 1 : -1;
      // Errors have no confidence: they go last either way.
      const key = (r) => (r.confidence === null ? null : r.confidence);
      list.sort((a, b) => {
        if (key(a) === null) return key(b) === null ? a.position - b.position : 1;
        if (key(b) === null) return -1;
        return sign * (key(a) - key(b)) || a.position - b.position;
      });
    } else {
      list.sort((a, b) => a.position - b.position);
    }
    return list;
  }

  function renderResults() {
    const list = visibleResults();
    const grid = document.getElementById("results");
    grid.replaceChildren(...list.slice(0, shown).map(card));
    const more = document.getElementById("results-more");
    more.hidden = list.length <= shown;
    let note = "Showing " + Math.min(shown, list.length) + " of " + list.length + " result(s)";
    if (resultsTotal > results.length) {
      note += "; the page holds the first " + results.length + " of " + resultsTotal +
        " — download the CSV or JSONL for all";
    }
    document.getElementById("results-count").textContent = note + ".";
    observeThumbnails(grid);
  }

  function card(result) {
    const name = result.image_path;
    if (result.status !== "succeeded") {
      return C.el(
        "li",
        { class: "result-card result-error", "data-status": result.status },
        C.el("div", { class: "thumb thumb-error", "aria-hidden": "true" }, "!"),
        C.el("p", { class: "result-name", title: name }, name),
        C.el("p", { class: "error-text" }, "Error: " + (result.error || "failed")),
      );
    }
    const probabilities = C.el("ul", { class: "probs", "aria-label": "Probabilities" });
    for (const emotion of emotions) {
      const value = result.all_probabilities ? result.all_probabilities[emotion] : null;
      const fill = C.el("span", { class: "prob-fill" });
      fill.style.width = (value || 0) * 100 + "%";
      probabilities.append(
        C.el(
          "li",
          { class: "prob" + (emotion === result.predicted_emotion ? " prob-top" : "") },
          C.el("span", { class: "prob-name" }, emotion),
          C.el("span", { class: "prob-track", "aria-hidden": "true" }, fill),
          C.el("span", { class: "prob-value" }, C.number(value, 3)),
        ),
      );
    }
    const thumb = C.el("div", { class: "thumb" });
    if (result.image_id !== undefined && result.image_id !== null) {
      thumb.setAttribute("data-image-id", result.image_id);
      thumb.setAttribute("data-alt", name);
      thumbResults.set(thumb, result);
    }
    return C.el(
      "li",
      {
        class: "result-card",
        "data-status": result.status,
        "data-emotion": result.predicted_emotion,
      },
      thumb,
      C.el("p", { class: "result-name", title: name }, name),
      C.el(
        "p",
        { class: "result-emotion" },
        C.el("strong", { class: "emotion" }, result.predicted_emotion),
        " ",
        C.el("span", { class: "confidence" }, C.percent(result.confidence)),
      ),
      C.el("p", { class: "result-faces" }, facesText(result)),
      probabilities,
      C.el(
        "p",
        { class: "hint" },
        "model version " + (result.model_version === null ? "–" : result.model_version),
      ),
    );
  }

  /** "3 faces: Happy, Sad, Fear" · "no face found: whole image" · "" (detection off). */
  function facesText(result) {
    const found = result.faces_found;
    if (found === null || found === undefined) return "whole image (no face detection)";
    if (found === 0) return "no face found: whole image classified";
    const names = (result.faces || []).map((face) => face.predicted_emotion);
    return found === 1 ? "1 face" : found + " faces: " + names.join(", ");
  }

  // -- thumbnails: fetched with the token (an <img src> can't send it), shown as blob: URLs --

  const thumbnailUrls = new Map();
  /** Each thumbnail box's result: its faces are drawn over the picture. */
  const thumbResults = new WeakMap();
  const waiting = [];
  let running = 0;
  let observer = null;

  function showThumbnail(box, url) {
    const image = C.el("img", { src: url, alt: box.getAttribute("data-alt") || "" });
    const result = thumbResults.get(box);
    box.replaceChildren(result ? withFaces(image, result) : image);
  }

  /**
   * The picture in a frame of the image's own aspect ratio, with each face's box and label on
   * top (boxes are in the original image's pixels: placed as percentages of its size).
   */
  function withFaces(image, result) {
    const faces = (result.faces || []).filter((face) => !face.whole_image);
    if (!result.image_size || !faces.length) return image;
    const [width, height] = result.image_size;
    const frame = C.el("div", { class: "thumb-frame " + (width >= height ? "wide" : "tall") });
    frame.style.aspectRatio = width + " / " + height;
    frame.append(image);
    for (const face of faces) {
      const [x0, y0, x1, y1] = face.box;
      const label = (faces.length > 1 ? face.index + 1 + " " : "") + face.predicted_emotion;
      const mark = C.el(
        "span",
        {
          class: "face-box" + (face.index === 0 ? " face-largest" : ""),
          title: label + " " + C.percent(face.confidence) + " (detector " +
            C.number(face.score, 2) + ")",
          "data-emotion": face.predicted_emotion,
        },
        C.el("span", { class: "face-label" }, label),
      );
      mark.style.left = Math.max(0, (x0 / width) * 100) + "%";
      mark.style.top = Math.max(0, (y0 / height) * 100) + "%";
      mark.style.width = (Math.min(x1, width) - Math.max(x0, 0)) / width * 100 + "%";
      mark.style.height = (Math.min(y1, height) - Math.max(y0, 0)) / height * 100 + "%";
      frame.append(mark);
    }
    return frame;
  }

  function pump() {
    while (running < THUMBNAIL_CONCURRENCY && waiting.length) {
      const box = waiting.shift();
      const id = box.getAttribute("data-image-id");
      if (thumbnailUrls.has(id)) {
        showThumbnail(box, thumbnailUrls.get(id));
        continue;
      }
      running += 1;
      C.request("/api/v1/jobs/" + jobId + "/images/" + id + "/thumbnail", {
        headers: { Accept: "image/*" },
      })
        .then((response) => response.blob())
        .then((blob) => {
          const url = URL.createObjectURL(blob);
          thumbnailUrls.set(id, url);
          for (const other of document.querySelectorAll('.thumb[data-image-id="' + id + '"]')) {
            showThumbnail(other, url);
          }
        })
        .catch((err) => {
          box.classList.add("thumb-error");
          box.textContent = "no preview";
          box.title = err.message;
        })
        .finally(() => {
          running -= 1;
          pump();
        });
    }
  }

  function observeThumbnails(grid) {
    const boxes = grid.querySelectorAll(".thumb[data-image-id]");
    if (!("IntersectionObserver" in window)) {
      waiting.push(...boxes);
      pump();
      return;
    }
    if (observer) observer.disconnect();
    observer = new IntersectionObserver(
      (entries) => {
        for (const entry of entries) {
          if (!entry.isIntersecting) continue;
          observer.unobserve(entry.target);
          const id = entry.target.getAttribute("data-image-id");
          if (thumbnailUrls.has(id)) showThumbnail(entry.target, thumbnailUrls.get(id));
          else waiting.push(entry.target);
        }
        pump();
      },
      { rootMargin: "200px" },
    );
    boxes.forEach((box) => observer.observe(box));
  }

  // -- wiring ---------------------------------------------------------------------------------

  function startPolling() {
    if (stopPolling) stopPolling();
    polls = 0;
    stopPolling = C.poll(refresh, POLL_SECONDS);
  }

  async function exportResults(format, button) {
    button.disabled = true;
    try {
      await C.download(
        "/api/v1/jobs/" + jobId + "/results?format=" + format,
        jobId + "-results." + format,
      );
      C.announce(format.toUpperCase() + " export downloaded.");
    } catch (err) {
      C.showError(err);
    } finally {
      button.disabled = false;
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    jobId = document.getElementById("job-id").getAttribute("data-job-id");
    emotions = Array.from(document.querySelectorAll("#filter-emotion option"))
      .map((option) => option.value)
      .filter((value) => value && !value.startsWith("__"));
    document.getElementById("job-cancel").addEventListener("click", cancel);
    for (const format of ["csv", "jsonl"]) {
      const button = document.getElementById("download-" + format);
      button.addEventListener("click", () => exportResults(format, button));
    }
    for (const id of ["filter-emotion", "sort-order"]) {
      document.getElementById(id).addEventListener("change", () => {
        shown = PAGE_CARDS;
        renderResults();
      });
    }
    document.getElementById("results-controls").addEventListener("submit", (event) => {
      event.preventDefault();
    });
    document.getElementById("results-more").addEventListener("click", () => {
      shown += PAGE_CARDS;
      renderResults();
    });
    document.addEventListener("console:token", startPolling);
    startPolling();
  });
})();
