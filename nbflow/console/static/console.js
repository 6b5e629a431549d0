// nbflow console: local times, and live refresh of the page's fragment from server-sent events.
(function () {
  "use strict";
  var body = document.body;

  function localTimes(root) {
    (root || document).querySelectorAll("time[data-ts]").forEach(function (t) {
      var d = new Date(parseFloat(t.dataset.ts) * 1000);
      if (isNaN(d)) return;
      if (!t.title) t.title = d.toISOString().replace(".000", "");
      t.textContent = d.toLocaleString(undefined, {year: "numeric", month: "short", day: "numeric",
                                                   hour: "2-digit", minute: "2-digit", second: "2-digit"});
    });
  }

  function zoneOffsetInputs() {
    document.querySelectorAll("form.filters").forEach(function (f) {
      if (f.querySelector("input[name=tzo]")) return;
      var i = document.createElement("input");
      i.type = "hidden"; i.name = "tzo"; i.value = String(new Date().getTimezoneOffset());
      f.appendChild(i);
    });
  }

  var live = body.dataset.live, topic = body.dataset.topic || "";
  var target = document.getElementById(body.dataset.target || "live");
  var status = document.getElementById("status");
  var timer = null, inflight = false, again = false;
  var approvals = {};   // run -> approvals waiting, to tell which run events matter to the inbox

  function keyOf(el) { return el.dataset.run ? el.dataset.run + "/" + (el.dataset.task || "") : ""; }

  function refresh() {
    if (!live || !target) return;
    if (inflight) { again = true; return; }
    inflight = true;
    var known = {};
    target.querySelectorAll("[data-task]").forEach(function (c) { known[keyOf(c)] = true; });
    var values = {}, focus = document.activeElement, focusId = focus && focus.id, sel = null;
    target.querySelectorAll("textarea[id], input[id]").forEach(function (i) { values[i.id] = i.value; });
    if (focus && focus.selectionStart !== undefined) sel = [focus.selectionStart, focus.selectionEnd];
    fetch(live, {credentials: "same-origin", headers: {"Accept": "text/html"}})
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.text(); })
      .then(function (html) {
        target.innerHTML = html;
        Object.keys(values).forEach(function (id) {
          var i = document.getElementById(id); if (i) i.value = values[id];
        });
        if (focusId) {
          var f = document.getElementById(focusId);
          if (f) { f.focus(); if (sel && f.setSelectionRange) try { f.setSelectionRange(sel[0], sel[1]); } catch (e) {} }
        }
        var fresh = 0;
        target.querySelectorAll("article.pending[data-task]").forEach(function (c) {
          if (!known[keyOf(c)]) { c.classList.add("new"); fresh++; }
        });
        localTimes(target);
        if (status) status.textContent = (fresh ? fresh + " new approval" + (fresh > 1 ? "s" : "") + ". " : "") +
          "Updated " + new Date().toLocaleTimeString();
        body.dataset.refreshed = String((parseInt(body.dataset.refreshed || "0", 10)) + 1);
      })
      .catch(function (e) { if (status) status.textContent = "Could not refresh (" + e.message + ")"; })
      .finally(function () { inflight = false; if (again) { again = false; schedule(); } });
  }

  function schedule() { if (!timer) timer = setTimeout(function () { timer = null; refresh(); }, 300); }

  function matters(m) {
    if (m.kind === "ready") return true;
    if (topic === "workers") return m.kind === "workers" || m.kind === "run";
    if (topic === "schedule") return m.kind === "schedule" || (m.kind === "run" && !!m.schedule);
    if (m.kind !== "run") return false;
    if (topic === "run") return true;
    if (topic.indexOf("run:") === 0) return m.run === topic.slice(4);
    if (topic === "approval") {
      var before = approvals[m.run] || 0;
      approvals[m.run] = m.approvals || 0;
      return (m.approvals || 0) !== before || (m.decided || 0) > 0 && before > 0;
    }
    return false;
  }

  localTimes(document);
  zoneOffsetInputs();
  if (live && window.EventSource) {
    if (topic === "approval") {
      document.querySelectorAll("article.pending[data-run]").forEach(function (c) {
        approvals[c.dataset.run] = (approvals[c.dataset.run] || 0) + 1;
      });
    }
    var es = new EventSource(body.dataset.events);
    es.onopen = function () { body.dataset.live_connected = "1"; };
    es.onmessage = function (ev) {
      var m; try { m = JSON.parse(ev.data); } catch (e) { return; }
      if (typeof m.pending === "number") {
        document.querySelectorAll(".nav-pending").forEach(function (c) {
          c.textContent = String(m.pending); c.setAttribute("aria-label", m.pending + " pending");
          c.hidden = m.pending === 0;
        });
      }
      if (matters(m)) schedule();
    };
    if (topic === "workers") setInterval(schedule, 10000);   // heartbeat ages
  }
})();
