/* Models page: versions and metrics, champion, live workers, confusion matrix, promote, train. */
"use strict";

(function () {
  const C = window.Console;
  const RUN_POLL_SECONDS = 3;
  const RUN_TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  let champion = null;
  let stopRuns = null;

  function cell(value, attributes = {}) {
    return C.el("td", attributes, value);
  }

  // -- versions and workers -------------------------------------------------------------------

  function versionRow(version) {
    const isChampion = version.version === champion;
    const aliases = C.el("td", {});
    for (const alias of version.aliases) {
      aliases.append(C.el("span", { class: "badge badge-alias" }, alias), " ");
    }
    if (!version.aliases.length) aliases.append("–");
    const action = C.el("td", {});
    if (isChampion) {
      action.append(C.el("span", { class: "hint" }, "serving"));
    } else {
      const button = C.el("button", { type: "button", class: "small" }, "Promote");
      button.setAttribute("aria-label", "Promote version " + version.version);
      button.addEventListener("click", () => promote(version.version, button));
      action.append(button);
    }
    return C.el(
      "tr",
      { class: isChampion ? "champion" : null, "data-version": version.version },
      C.el("th", { scope: "row" }, "v" + version.version),
      aliases,
      cell(version.architecture || "–"),
      cell(version.image_size === null ? "–" : version.image_size + " px"),
      cell(C.number(version.accuracy, 4)),
      cell(C.number(version.weighted_f1, 4)),
      cell(C.number(version.macro_f1, 4)),
      int8Cell(version.int8),
      cell(C.when(version.created_at)),
      action,
    );
  }

  // The INT8 gate's outcome: a failed gate is shown with its reason, never hidden.
  function int8Cell(int8) {
    if (!int8 || int8.gate === "none") return cell("–");
    const d = int8.accuracy_drop;
    const drop = d === null ? "" : " (" + (d > 0 ? "−" : "+") + C.number(100 * Math.abs(d), 2) + " pt)";
    if (int8.gate === "failed") {
      const badge = C.el("span", { class: "badge badge-failed" }, "failed");
      return C.el("td", {}, badge, drop, " ", C.el("span", { class: "hint" }, int8.failures || ""));
    }
    const td = cell(int8.gate + drop);
    if (int8.agreement !== null) td.title = "top-1 agreement with fp32: " + C.percent(int8.agreement);
    return td;
  }

  function workerRow(worker) {
    // A worker process loads its model with its first task: an idle one may have none yet.
    const version =
      worker.model_version !== null
        ? "v" + worker.model_version + (worker.model_version === champion ? " (champion)" : "")
        : worker.state === "busy"
          ? "loading"
          : "none loaded yet";
    return C.el(
      "tr",
      {},
      C.el("th", { scope: "row", class: "mono" }, worker.name),
      cell(worker.state || "–"),
      cell(version),
      cell(worker.device || "–"),
      cell(worker.backend || "–"),
      cell(worker.images_processed),
      cell(C.when(worker.last_seen)),
    );
  }

  async function loadModels() {
    const body = await C.getJSON("/api/v1/models");
    champion = body.champion;
    document.getElementById("model-name").textContent = body.model;
    document.querySelector("#versions tbody").replaceChildren(...body.versions.map(versionRow));
    document.querySelector("#workers tbody").replaceChildren(...body.workers.map(workerRow));
    const empty = document.getElementById("workers-empty");
    empty.textContent = "No worker has reported in the last " + body.worker_stale_seconds + " s.";
    empty.hidden = body.workers.length > 0;
    await loadWarnings();

    const select = document.getElementById("matrix-version");
    const previous = select.value;
    select.replaceChildren(
      ...body.versions.map((version) =>
        C.el(
          "option",
          { value: version.version },
          "v" + version.version + (version.version === champion ? " (champion)" : ""),
        ),
      ),
    );
    const wanted = previous || (champion === null ? "" : String(champion));
    if (wanted && body.versions.some((v) => String(v.version) === wanted)) select.value = wanted;
    if (select.value) await loadMatrix(select.value);
    else document.getElementById("matrix").replaceChildren(C.el("p", { class: "hint" }, "No version is registered yet."));
  }

  /** What would make work wait: no worker or no trainer consuming its queue (/readyz). The
   * probe needs no token, and a 503 still carries the warnings, so it is read whatever its
   * status. */
  async function loadWarnings() {
    const box = document.getElementById("queue-warnings");
    const response = await fetch("/readyz", { headers: { Accept: "application/json" } });
    const ready = await response.json().catch(() => ({}));
    const warnings = ready.warnings || [];
    box.replaceChildren(...warnings.map((text) => C.el("li", {}, text)));
    box.hidden = warnings.length === 0;
  }

  async function promote(version, button) {
    button.disabled = true;
    C.clearError();
    try {
      const body = await C.sendJSON("POST", "/api/v1/models/" + version + "/promote");
      C.announce(
        "Version " + body.version + " is now " + body.alias +
          (body.previous === null ? "." : " (was version " + body.previous + ")."),
      );
      await loadModels();
    } catch (err) {
      C.showError(err);
      button.disabled = false;
    }
  }

  // -- confusion matrix -----------------------------------------------------------------------

  async function loadMatrix(version) {
    const box = document.getElementById("matrix");
    let evaluation;
    try {
      evaluation = await C.getJSON("/api/v1/models/" + version + "/evaluation");
    } catch (err) {
      if (err.status === 404) {
        box.replaceChildren(C.el("p", { class: "hint" }, err.message));
        return;
      }
      throw err;
    }
    const classes = evaluation.classes;
    const matrix = evaluation.confusion_matrix;
    const table = C.el("table", { class: "matrix" });
    table.append(
      C.el(
        "caption",
        {},
        "v" + evaluation.version + ": " + evaluation.num_images + " test images, accuracy " +
          C.percent(evaluation.accuracy) + ", weighted F1 " + C.number(evaluation.weighted_f1, 3) +
          ". Rows: true class; columns: predicted.",
      ),
    );
    const head = C.el("tr", {}, C.el("td", {}));
    classes.forEach((name) => head.append(C.el("th", { scope: "col" }, name)));
    head.append(C.el("th", { scope: "col" }, "Recall"));
    table.append(C.el("thead", {}, head));
    const body = C.el("tbody", {});
    matrix.forEach((row, i) => {
      const total = row.reduce((a, b) => a + b, 0);
      const tr = C.el("tr", {}, C.el("th", { scope: "row" }, classes[i]));
      row.forEach((count, j) => {
        const share = total ? count / total : 0;
        const td = C.el("td", { class: i === j ? "diagonal" : null }, count);
        td.title = C.percent(share) + " of true " + classes[i];
        // Row-normalised shading, so small classes read as well as big ones (CSSOM).
        td.style.setProperty("--share", share.toFixed(3));
        if (share > 0.55) td.classList.add("dark");
        tr.append(td);
      });
      const metrics = evaluation.per_class[classes[i]];
      tr.append(C.el("td", { class: "recall" }, metrics ? C.percent(metrics.recall) : "–"));
      body.append(tr);
    });
    table.append(body);
    const parts = [C.el("div", { class: "table-wrap" }, table)];
    if (evaluation.failures && evaluation.failures.length) {
      parts.push(C.el("p", { class: "error-text" }, "Misses targets: " + evaluation.failures.join("; ")));
    }
    box.replaceChildren(...parts);
  }

  // -- training runs --------------------------------------------------------------------------

  function progressText(run) {
    const progress = run.progress;
    if (run.status !== "running" || !progress) return "";
    const parts = [progress.stage || "running"];
    if (progress.epoch) parts.push("epoch " + progress.epoch + "/" + (progress.max_epochs || "?"));
    if (progress.total_steps) parts.push("step " + progress.step + "/" + progress.total_steps);
    const metrics = progress.metrics || {};
    for (const key of ["val_loss", "val_acc"]) {
      if (typeof metrics[key] === "number") parts.push(key + " " + C.number(metrics[key], 3));
    }
    if (typeof progress.eta_seconds === "number") {
      parts.push("at most " + Math.ceil(progress.eta_seconds / 60) + " min left");
    }
    return parts.join(" · ");
  }

  async function cancelRun(run, button) {
    button.disabled = true;
    C.clearError();
    try {
      const body = await C.sendJSON("DELETE", "/api/v1/training-runs/" + run.id);
      C.announce(
        "Training run " + run.id.slice(0, 8) +
          (body.status === "cancelled" ? " cancelled." : " is being stopped."),
      );
      watchRuns();
    } catch (err) {
      C.showError(err);
      button.disabled = false;
    }
  }

  function runRow(run) {
    const accuracy = run.metrics ? run.metrics.test_accuracy : null;
    const status = C.el("td", {}, C.badge(run.status));
    const progress = progressText(run);
    if (progress) status.append(C.el("p", { class: "hint" }, progress));
    if (run.cancel_requested && run.status === "running") {
      status.append(C.el("p", { class: "hint" }, "stopping…"));
    }
    if (run.error) status.append(C.el("p", { class: "error-text" }, run.error));
    if (!RUN_TERMINAL.has(run.status) && !run.cancel_requested) {
      const button = C.el("button", { type: "button", class: "small secondary" }, "Cancel");
      button.setAttribute("aria-label", "Cancel training run " + run.id.slice(0, 8));
      button.addEventListener("click", () => cancelRun(run, button));
      status.append(button);
    }
    return C.el(
      "tr",
      {},
      C.el("th", { scope: "row", class: "mono" }, run.id.slice(0, 8)),
      status,
      cell(run.data),
      cell(run.overrides.join(" ") || "–"),
      cell(run.registered_version === null ? "–" : "v" + run.registered_version),
      cell(run.promoted ? "yes" : run.promotion_reason || "no"),
      cell(typeof accuracy === "number" ? C.percent(accuracy) : "–"),
      cell(C.when(run.created_at)),
    );
  }

  async function loadRuns() {
    const note = document.getElementById("runs-note");
    let page;
    try {
      page = await C.getJSON("/api/v1/training-runs?limit=10");
    } catch (err) {
      if (err.status === 403) {
        note.textContent = "Training runs are visible to admin tokens only.";
        return false;
      }
      throw err;
    }
    note.textContent = page.items.length ? "" : "No training run yet.";
    document.querySelector("#runs tbody").replaceChildren(...page.items.map(runRow));
    const active = page.items.some((run) => !RUN_TERMINAL.has(run.status));
    if (!active && page.items.some((run) => run.promoted)) await loadModels();
    return active;
  }

  function watchRuns() {
    if (stopRuns) stopRuns();
    stopRuns = C.poll(loadRuns, RUN_POLL_SECONDS);
  }

  async function train(event) {
    event.preventDefault();
    C.clearError();
    const form = event.currentTarget;
    const data = form.elements.data.value.trim();
    if (!data) {
      C.showError("Name the labelled folder to train on.");
      form.elements.data.focus();
      return;
    }
    const body = { data, promote: form.elements.promote.value };
    const model = form.elements.model.value.trim();
    if (model) body.model = model;
    const epochs = form.elements.epochs.value.trim();
    if (epochs) body.epochs = Number(epochs);
    body.overrides = form.elements.overrides.value
      .split("\n")
      .map((line) => line.trim())
      .filter(Boolean);
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      const run = await C.sendJSON("POST", "/api/v1/training-runs", body);
      C.announce(
        "Training run " + run.id + " queued" + (run.warning ? ". Warning: " + run.warning : "."),
      );
      watchRuns();
    } catch (err) {
      C.showError(err);
    } finally {
      button.disabled = false;
    }
  }

  async function loadAll() {
    try {
      await loadModels();
    } catch (err) {
      C.showError(err);
    }
    watchRuns();
  }

  document.addEventListener("DOMContentLoaded", () => {
    document.getElementById("models-refresh").addEventListener("click", loadAll);
    document.getElementById("matrix-version").addEventListener("change", (event) => {
      loadMatrix(event.currentTarget.value).catch(C.showError);
    });
    document.getElementById("train-form").addEventListener("submit", train);
    document.addEventListener("console:token", loadAll);
    loadAll();
  });
})();
