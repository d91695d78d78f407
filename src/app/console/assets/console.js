// userhub console: the few things a server-rendered page cannot do by itself.
// Loaded with `defer` from the console's own origin (the CSP allows nothing else).
"use strict";

(function () {
  // A user's page: follow the enrichment status live, through the console's event
  // stream (authenticated by the session cookie), until it is final.
  function followStatus(region) {
    var url = region.getAttribute("data-status-url");
    var indicator = document.getElementById("live-indicator");
    if (!url || region.getAttribute("data-final") === "true" || !window.EventSource) {
      return;
    }
    var source = new EventSource(url);
    if (indicator) {
      indicator.textContent = "Watching for changes…";
    }
    source.addEventListener("status", function (event) {
      var update = JSON.parse(event.data);
      if (update.status !== region.getAttribute("data-status")) {
        region.innerHTML = update.html;
        region.setAttribute("data-status", update.status);
      }
      if (update.final) {
        source.close();
        region.setAttribute("data-final", "true");
        if (indicator) {
          indicator.textContent = "";
        }
      }
    });
    source.addEventListener("error", function () {
      // Closed for good (signed out, refused): the browser will not retry.
      if (source.readyState === EventSource.CLOSED && indicator) {
        indicator.textContent = "Live updates stopped. Reload the page to see the latest status.";
      }
    });
  }

  // Forms: one submission at a time, and say that something is happening.
  function guardForm(form) {
    form.addEventListener("submit", function (event) {
      if (form.getAttribute("aria-busy") === "true") {
        event.preventDefault();
        return;
      }
      form.setAttribute("aria-busy", "true");
      var button = form.querySelector("button[type=submit]");
      if (button) {
        button.setAttribute("aria-disabled", "true");
        button.textContent = form.getAttribute("data-busy-label");
      }
    });
  }

  function start() {
    var region = document.getElementById("enrichment-status");
    if (region) {
      followStatus(region);
    }
    document.querySelectorAll("form[data-busy-label]").forEach(guardForm);
    // After a refused form, take keyboard and screen-reader users to the summary.
    var summary = document.getElementById("error-summary");
    if (summary) {
      summary.focus();
    }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
