/* Home page: submit a job (files, one zip, or a server folder) and follow recent jobs. */
"use strict";

(function () {
  const C = window.Console;
  const ACTIVE_POLL_SECONDS = 1;
  const IDLE_POLL_SECONDS = 15;
  let chosenFiles = [];
  let timer = null;

  function describeFiles() {
    const summary = document.getElementById("file-summary");
    if (!chosenFiles.length) {
      summary.textContent = "No files chosen.";
      return;
    }
    const bytes = chosenFiles.reduce((sum, file) => sum + file.size, 0);
    const names = chosenFiles.slice(0, 5).map((file) => file.name);
    const more = chosenFiles.length > 5 ? ", …" : "";
    summary.textContent =
      chosenFiles.length +
      (chosenFiles.length === 1 ? " file" : " files") +
      " (" +
      (bytes / 1024).toFixed(1) +
      " KiB): " +
      names.join(", ") +
      more;
  }

  function initDropzone() {
    const zone = document.getElementById("dropzone");
    const input = document.getElementById("files");
    input.addEventListener("change", () => {
      chosenFiles = Array.from(input.files);
      describeFiles();
    });
    for (const type of ["dragenter", "dragover"]) {
      zone.addEventListener(type, (event) => {
        event.preventDefault();
        zone.classList.add("dragging");
      });
    }
    for (const type of ["dragleave", "drop"]) {
      zone.addEventListener(type, () => zone.classList.remove("dragging"));
    }
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      const files = Array.from(event.dataTransfer.files || []);
      if (!files.length) return;
      chosenFiles = files;
      try {
        const transfer = new DataTransfer();
        files.forEach((file) => transfer.items.add(file));
        input.files = transfer.files;
      } catch (_) {
        /* older browsers: chosenFiles alone is submitted */
      }
      describeFiles();
      C.announce(files.length + " file(s) ready to submit.");
    });
  }

  function batchSize(form) {
    const raw = form.elements.batch_size.value.trim();
    return raw === "" ? null : Number(raw);
  }

  async function submit(event) {
    event.preventDefault();
    const form = event.currentTarget;
    const button = document.getElementById("submit-button");
    C.clearError();
    const folder = form.elements.folder.value.trim();
    const size = batchSize(form);
    const faces = form.elements.faces.value;
    if (size !== null && (!Number.isInteger(size) || size < 1)) {
      C.showError("Batch size must be a whole number of at least 1.");
      form.elements.batch_size.focus();
      return;
    }
    let job;
    button.disabled = true;
    try {
      if (chosenFiles.length) {
        const body = new FormData();
        // Field names as the API documents them: files (repeated), batch_size, faces.
        chosenFiles.forEach((file) => body.append("files", file, file.name));
        if (size !== null) body.append("batch_size", String(size));
        if (faces) body.append("faces", faces);
        C.announce("Uploading " + chosenFiles.length + " file(s)…");
        job = await (await C.request("/api/v1/jobs", { method: "POST", body })).json();
      } else if (folder) {
        const body = { folder, recursive: form.elements.recursive.checked };
        if (size !== null) body.batch_size = size;
        if (faces) body.faces = faces;
        C.announce("Submitting folder " + folder + "…");
        job = await C.sendJSON("POST", "/api/v1/jobs", body);
      } else {
        C.showError("Choose images (or one .zip), or type a folder on the server.");
        document.getElementById("files").focus();
        return;
      }
    } catch (err) {
      C.announce("");
      C.showError(err);
      return;
    } finally {
      button.disabled = false;
    }
    C.announce(
      "Job " + job.id + " accepted: " + job.total + " image(s)" +
        (job.warning ? ". Warning: " + job.warning : "") + ".",
    );
    form.reset();
    chosenFiles = [];
    describeFiles();
    refreshJobs();
  }

  async function cancel(job, button) {
    button.disabled = true;
    try {
      await C.request("/api/v1/jobs/" + job.id, { method: "DELETE" });
      C.announce("Job " + job.id + " cancelled.");
    } catch (err) {
      C.showError(err);
    }
    refreshJobs();
  }

  function jobItem(job) {
    const processed = job.done + job.failed;
    const bar = C.progressBar("Progress of job " + job.id);
    const text = Math.round(job.progress * 100) + "% · " + processed + " / " + job.total;
    C.setProgress(bar, job.progress, text);
    const link = C.el(
      "a",
      { href: "/jobs/" + job.id, class: "mono", "data-focus": "open:" + job.id },
      job.id.slice(0, 8),
    );
    link.setAttribute("aria-label", "Open job " + job.id);
    const item = C.el(
      "li",
      { class: "job-item", "data-job-id": job.id, "data-status": job.status },
      C.el(
        "div",
        { class: "job-head" },
        link,
        C.badge(job.status),
        C.el("span", { class: "job-source" }, job.source_type + ": " + job.source),
      ),
      bar,
      C.el(
        "div",
        { class: "job-meta" },
        C.el("span", { class: "progress-text" }, text),
        job.failed ? C.el("span", { class: "error-text" }, job.failed + " failed") : null,
        C.el("span", {}, C.when(job.created_at)),
      ),
    );
    if (!C.TERMINAL.has(job.status)) {
      const button = C.el(
        "button",
        { type: "button", class: "danger small", "data-focus": "cancel:" + job.id },
        "Cancel",
      );
      button.setAttribute("aria-label", "Cancel job " + job.id);
      button.addEventListener("click", () => cancel(job, button));
      item.querySelector(".job-head").append(button);
    }
    return item;
  }

  async function loadJobs() {
    const page = await C.getJSON("/api/v1/jobs?limit=20");
    const list = document.getElementById("jobs");
    // Re-rendered every second: keep keyboard focus on the same control.
    const focused = list.contains(document.activeElement)
      ? document.activeElement.getAttribute("data-focus")
      : null;
    list.replaceChildren(...page.items.map(jobItem));
    if (focused) {
      const again = list.querySelector('[data-focus="' + CSS.escape(focused) + '"]');
      if (again) again.focus();
    }
    document.getElementById("jobs-empty").hidden = page.items.length > 0;
    return page.items.some((job) => !C.TERMINAL.has(job.status));
  }

  /** Poll every second while a job is active, slowly otherwise; stop on an error. */
  async function refreshJobs() {
    clearTimeout(timer);
    let active;
    try {
      active = await loadJobs();
    } catch (err) {
      C.showError(err);
      return;
    }
    timer = setTimeout(refreshJobs, (active ? ACTIVE_POLL_SECONDS : IDLE_POLL_SECONDS) * 1000);
  }

  document.addEventListener("DOMContentLoaded", () => {
    initDropzone();
    const form = document.getElementById("submit-form");
    form.addEventListener("submit", submit);
    form.addEventListener("reset", () => {
      chosenFiles = [];
      describeFiles();
    });
    document.getElementById("jobs-refresh").addEventListener("click", refreshJobs);
    document.addEventListener("console:token", refreshJobs);
    refreshJobs();
  });
})();
