// cxr-gateway dashboard: live updates, drag-and-drop upload, confirmations. No framework, no inline code
// (the Content-Security-Policy allows scripts from /static only).
"use strict";

const FINAL = new Set(["done", "failed", "skipped"]);

// [data-live-url]: replace the element's content with the server-rendered fragment every few seconds;
// stop once the fragment says it is settled ([data-live-final]); pause while the tab is hidden.
function live(el) {
  const url = el.dataset.liveUrl;
  const every = 1000 * (parseFloat(el.dataset.liveSeconds) || 3);
  let timer = null;
  async function tick() {
    timer = null;
    if (document.hidden) { schedule(); return; }
    try {
      const r = await fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } });
      if (r.redirected || r.status === 401) { window.location.reload(); return; }
      if (!r.ok) { schedule(); return; }
      el.innerHTML = await r.text();
    } catch (e) { schedule(); return; }
    const status = el.querySelector("[data-live-status]");
    if (el.hasAttribute("data-live-reload-on-final") && status && FINAL.has(status.dataset.liveStatus)) {
      window.location.reload();  // findings and heatmaps are rendered with the full page
      return;
    }
    if (!el.querySelector("[data-live-final]")) schedule();
  }
  function schedule() { if (!timer) timer = setTimeout(tick, every); }
  schedule();
}

// [data-live-redirect]: ask the URL until it redirects elsewhere (an upload's study got its job).
function follow(el) {
  const url = el.dataset.liveRedirect;
  const every = 1000 * (parseFloat(el.dataset.liveSeconds) || 2);
  setTimeout(async function poll() {
    try {
      const r = await fetch(url, { credentials: "same-origin" });
      if (r.redirected) { window.location.assign(r.url); return; }
    } catch (e) { /* try again */ }
    setTimeout(poll, every);
  }, every);
}

function dropzone(zone) {
  const input = zone.querySelector("input[type=file]");
  const name = zone.querySelector(".dz-file");
  const show = () => { name.textContent = input.files.length ? input.files[0].name : ""; };
  input.addEventListener("change", show);
  ["dragenter", "dragover"].forEach((t) => zone.addEventListener(t, (e) => {
    e.preventDefault(); zone.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((t) => zone.addEventListener(t, (e) => {
    e.preventDefault(); zone.classList.remove("over");
  }));
  zone.addEventListener("drop", (e) => {
    if (e.dataTransfer && e.dataTransfer.files.length) { input.files = e.dataTransfer.files; show(); }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-live-url]").forEach(live);
  document.querySelectorAll("[data-live-redirect]").forEach(follow);
  document.querySelectorAll(".dropzone").forEach(dropzone);
  document.querySelectorAll("form[data-confirm]").forEach((form) => {
    form.addEventListener("submit", (e) => { if (!window.confirm(form.dataset.confirm)) e.preventDefault(); });
  });
  const upload = document.getElementById("upload-form");
  if (upload) upload.addEventListener("submit", () => {
    const b = document.getElementById("upload-submit");
    b.disabled = true; b.textContent = "Sending to the listener…";
  });
});
