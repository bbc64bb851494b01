/* face-emotions console: what every page shares.
 *
 * The pages hold no data: everything comes from the JSON REST API, called with the token the
 * user typed (sessionStorage, this tab only) as "Authorization: Bearer". API errors
 * ({"error": {"code", "message"}}) are shown in the page's alert region, never swallowed.
 * Elements are built with textContent, never innerHTML, so no API value can become markup.
 */
"use strict";

(function () {
  const TOKEN_KEY = "face-emotions-token";
  const TERMINAL = new Set(["succeeded", "completed_with_errors", "failed", "cancelled"]);

  class ApiError extends Error {
    constructor(status, code, message, body = null) {
      super(message);
      this.status = status;
      this.code = code;
      this.body = body;
    }
  }

  function getToken() {
    try {
      return sessionStorage.getItem(TOKEN_KEY) || "";
    } catch (_) {
      return "";
    }
  }

  function setToken(token) {
    try {
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch (err) {
      showError("This browser refuses to keep the token (sessionStorage): " + err.message);
    }
  }

  async function errorFrom(response) {
    let code = "http_" + response.status;
    let message = response.status + " " + (response.statusText || "error");
    let body = null;
    try {
      body = await response.json();
      if (body && body.error) {
        code = body.error.code || code;
        message = body.error.message || message;
      }
    } catch (_) {
      /* not JSON: keep the status line */
    }
    if (response.status === 401) {
      message += getToken() ? " (check the API token above)" : " (enter an API token above)";
    }
    return new ApiError(response.status, code, message, body);
  }

  /** fetch() an API path with the token; resolves to the Response, rejects with ApiError. */
  async function request(path, options = {}) {
    const headers = new Headers(options.headers || {});
    const token = getToken();
    if (token) headers.set("Authorization", "Bearer " + token);
    if (!headers.has("Accept")) headers.set("Accept", "application/json");
    let response;
    try {
      response = await fetch(path, { ...options, headers, credentials: "omit" });
    } catch (err) {
      throw new ApiError(0, "network_error", "The API is unreachable: " + err.message);
    }
    if (!response.ok) throw await errorFrom(response);
    return response;
  }

  async function getJSON(path) {
    return (await request(path)).json();
  }

  async function sendJSON(method, path, body) {
    const options = { method, headers: { "Content-Type": "application/json" } };
    if (body !== undefined) options.body = JSON.stringify(body);
    return (await request(path, options)).json();
  }

  /** Fetch an export with the token and save it: a plain link can't carry the header. */
  async function download(path, fallbackName) {
    const response = await request(path, { headers: { Accept: "*/*" } });
    const blob = await response.blob();
    const disposition = response.headers.get("Content-Disposition") || "";
    const match = /filename="?([^";]+)"?/.exec(disposition);
    const url = URL.createObjectURL(blob);
    const link = el("a", { href: url, download: match ? match[1] : fallbackName });
    link.hidden = true;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  }

  // -- messages ---------------------------------------------------------------------------

  function announce(text) {
    const region = document.getElementById("status");
    if (region) region.textContent = text;
  }

  function showError(error) {
    const region = document.getElementById("alert");
    const message =
      error instanceof ApiError && error.code && !error.code.startsWith("http_")
        ? error.message + " [" + error.code + "]"
        : error && error.message
          ? error.message
          : String(error);
    if (!region) {
      console.error(message);
      return;
    }
    const close = el("button", { type: "button", class: "link-button" }, "Dismiss");
    close.addEventListener("click", clearError);
    region.replaceChildren(el("span", {}, message), " ", close);
    region.hidden = false;
  }

  function clearError() {
    const region = document.getElementById("alert");
    if (region) {
      region.hidden = true;
      region.replaceChildren();
    }
  }

  // -- DOM helpers ----------------------------------------------------------------------------

  /** el("a", {href: "/x", class: "y"}, "text", child...) */
  function el(tag, attributes = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) {
      if (value === undefined || value === null || value === false) continue;
      node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === undefined || child === null) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function badge(status) {
    return el("span", { class: "badge badge-" + status }, status.replaceAll("_", " "));
  }

  /** Update a role=progressbar element (fraction 0..1) and its optional text element. */
  function setProgress(bar, fraction, text) {
    const percent = Math.max(0, Math.min(100, Math.round((fraction || 0) * 100)));
    bar.setAttribute("aria-valuenow", String(percent));
    bar.setAttribute("aria-valuetext", text || percent + "%");
    const fill = bar.querySelector(".progress-fill");
    // CSSOM, not a style attribute: allowed by the page's style-src 'self'.
    if (fill) fill.style.width = percent + "%";
  }

  function progressBar(label) {
    const bar = el("div", {
      class: "progress",
      role: "progressbar",
      "aria-label": label,
      "aria-valuemin": "0",
      "aria-valuemax": "100",
      "aria-valuenow": "0",
    });
    bar.append(el("div", { class: "progress-fill" }));
    return bar;
  }

  function percent(value, digits = 1) {
    return value === null || value === undefined ? "–" : (value * 100).toFixed(digits) + "%";
  }

  function number(value, digits = 3) {
    return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
  }

  function when(iso) {
    if (!iso) return "–";
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
  }

  // -- token form -----------------------------------------------------------------------------

  function initTokenForm() {
    const form = document.getElementById("token-form");
    const input = document.getElementById("api-token");
    if (!form || !input) return;
    input.value = getToken();
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      setToken(input.value.trim());
      clearError();
      announce(input.value.trim() ? "Token saved for this tab." : "Token cleared.");
      document.dispatchEvent(new CustomEvent("console:token"));
    });
    document.getElementById("token-clear").addEventListener("click", () => {
      input.value = "";
      setToken("");
      announce("Token forgotten.");
      document.dispatchEvent(new CustomEvent("console:token"));
    });
  }

  /** Call fn now and every `seconds` while it returns true; returns a stop function. */
  function poll(fn, seconds) {
    let timer = null;
    let stopped = false;
    const tick = async () => {
      let again = false;
      try {
        again = await fn();
      } catch (err) {
        showError(err);
      }
      if (again && !stopped) timer = setTimeout(tick, seconds * 1000);
    };
    tick();
    return () => {
      stopped = true;
      clearTimeout(timer);
    };
  }

  window.Console = {
    ApiError,
    TERMINAL,
    announce,
    badge,
    clearError,
    download,
    el,
    getJSON,
    getToken,
    number,
    percent,
    poll,
    progressBar,
    request,
    sendJSON,
    setProgress,
    showError,
    when,
  };

  document.addEventListener("DOMContentLoaded", initTokenForm);
})();
