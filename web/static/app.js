// crm-bridge admin pages: progressive behaviour only. The pages are rendered on the server;
// this script sends the forms to the pages' JSON API (with the session's CSRF token), shows
// the answers, confirms destructive actions and keeps the journal live (server-sent events).
// Every text shown comes from the page's <template> elements: the words live in templates.
"use strict";
(function () {
  const meta = (name) => (document.querySelector(`meta[name="${name}"]`) || {}).content || "";
  const csrf = meta("csrf-token");
  const api = meta("api-base");
  const enterprise = document.body.dataset.enterprise || "";

  function texts(id) {
    const out = {};
    const holder = document.getElementById(id);
    if (holder) {
      for (const el of holder.content.querySelectorAll("[data-key]")) {
        out[el.dataset.key] = el.textContent.trim();
      }
    }
    return out;
  }
  const common = texts("messages");

  async function call(method, path, body) {
    const options = {method, credentials: "same-origin",
                     headers: {"X-CSRF-Token": csrf, "Accept": "application/json"}};
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(api + path, options);
    } catch (error) {
      return {ok: false, status: 0, body: {message: common.network}};
    }
    let data = {};
    try { data = await response.json(); } catch (error) { data = {}; }
    return {ok: response.ok, status: response.status, body: data};
  }

  function show(title, message, items) {
    const box = document.getElementById("result");
    if (!box) return;
    box.hidden = false;
    box.querySelector("[data-part=title]").textContent = title || "";
    box.querySelector("[data-part=message]").textContent = message || "";
    const list = box.querySelector("[data-part=list]");
    list.replaceChildren();
    for (const item of items || []) {
      const li = document.createElement("li");
      li.textContent = item;
      list.appendChild(li);
    }
  }

  function failure(answer, own) {
    const body = answer.body || {};
    const field = body.details && body.details.field;
    const title = field ? `${own.invalid || common.failed} «${field}»` : common.failed;
    show(title, body.message || "", body.warnings || []);
  }

  function busy(button, on) {
    if (button) button.disabled = on;
    if (on) show(common.working, "", []);
  }

  // ------------------------------------------------------------------ connection page
  function collect(form) {
    const values = {};
    for (const field of form.querySelectorAll("input[name], select[name], textarea[name]")) {
      if (field.type === "checkbox") {
        values[field.name] = field.checked;
      } else if (field.dataset.kind === "map") {
        const map = {};
        for (const line of field.value.split("\n")) {
          const at = line.indexOf("=");
          if (at > 0) map[line.slice(0, at).trim()] = line.slice(at + 1).trim();
        }
        values[field.name] = map;
      } else if (!(field.dataset.optional !== undefined && field.value === "")) {
        values[field.name] = field.value;
      }
    }
    return values;
  }

  function connection(form) {
    const own = texts("connection-texts");
    const path = (what) => `/${what}/${encodeURIComponent(enterprise)}`;
    form.addEventListener("click", async (event) => {
      const button = event.target.closest("button[data-action]");
      if (!button) return;
      const action = button.dataset.action;
      if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) return;
      busy(button, true);
      try {
        if (action === "test") {
          const answer = await call("POST", path("test-connection"), collect(form));
          if (!answer.ok) return failure(answer, own);
          const missing = answer.body.missing_scopes || [];
          show(answer.body.ok ? own["test-ok"] : own["test-failed"], answer.body.message,
               missing.length ? [`${own["missing-scopes"]} ${missing.join(", ")}`] : []);
        } else if (action === "save" || action === "save-register") {
          const saved = await call("PUT", path("config"), collect(form));
          if (!saved.ok) return failure(saved, own);
          form.querySelector("input[name=api_key]").value = "";
          form.querySelector("input[name=api_key]").placeholder = saved.body.settings.api_key;
          if (action === "save") return show(own.saved, "", []);
          const answer = await call("POST", path("register"));
          const unknown = answer.body.unknown_users || [];
          const items = [...(answer.body.warnings || [])];
          if (unknown.length) items.unshift(`${own["unknown-users"]} ${unknown.join(", ")}`);
          show(answer.ok ? own.registered : own["not-registered"], answer.body.message, items);
        } else if (action === "delete") {
          const answer = await call("DELETE", path("config"));
          show(answer.ok ? own.deleted : own["delete-failed"], answer.body.message, []);
        }
      } finally {
        busy(button, false);
      }
    });
  }

  // ------------------------------------------------------------------ managers page
  function extensions(form) {
    const own = texts("managers-texts");
    const rows = () => [...document.querySelectorAll("tr[data-user-id]")];
    const name = (id) => {
      const row = rows().find((r) => r.dataset.userId === String(id));
      return row ? row.dataset.name : `#${id}`;
    };
    form.addEventListener("click", async (event) => {
      const button = event.target.closest("button[data-action=save-extensions]");
      if (!button) return;
      const changes = {};
      for (const select of form.querySelectorAll("select")) {
        if (select.value !== select.dataset.initial) changes[select.name] = select.value || null;
      }
      if (!Object.keys(changes).length) return show(own.nothing, "", []);
      busy(button, true);
      try {
        const answer = await call("POST", `/user-extensions/${encodeURIComponent(enterprise)}`,
                                  {user_extensions: changes});
        if (!answer.ok) return failure(answer, own);
        const map = answer.body.user_extensions || {};
        for (const row of rows()) {
          const number = map[row.dataset.userId] || "";
          const select = row.querySelector("select");
          select.value = number;
          select.dataset.initial = number;
          row.querySelector(".current").textContent = number || "—";
        }
        const moves = (answer.body.moves || []).map((m) => own.moved
          .replace("{number}", m.number).replace("{from}", name(m.from_user))
          .replace("{to}", name(m.to_user)));
        show(answer.body.synced || !answer.body.sync_pending ? own.saved : own.pending,
             answer.body.message, [...moves, ...(answer.body.warnings || [])]);
      } finally {
        busy(button, false);
      }
    });
  }

  function sync(button) {
    const own = texts("managers-texts");
    button.addEventListener("click", async () => {
      busy(button, true);
      try {
        const answer = await call("POST", `/sync-extensions/${encodeURIComponent(enterprise)}`);
        show(answer.ok ? own.synced : own["sync-failed"], answer.body.message,
             answer.body.warnings || []);
      } finally {
        busy(button, false);
      }
    });
  }

  // ------------------------------------------------------------------ journal page
  function fill(row, item) {
    row.dataset.eventId = item.event_id;
    row.dataset.status = item.status;
    for (const cell of row.querySelectorAll("[data-field]")) {
      const value = item[cell.dataset.field];
      cell.textContent = value === null || value === undefined ? "" : String(value);
    }
    row.querySelector("button[data-action=replay]").hidden = !item.replayable;
  }

  function journal(table) {
    const own = texts("journal-texts");
    const body = table.tBodies[0];
    const blank = document.getElementById("journal-row");
    table.addEventListener("click", async (event) => {
      const button = event.target.closest("button[data-action]");
      if (!button) return;
      const row = button.closest("tr[data-event-id]");
      const id = row.dataset.eventId;
      const before = row.dataset.status;
      button.disabled = true;
      try {
        if (button.dataset.action === "replay") {
          const answer = await call("POST", `/deliveries/${encodeURIComponent(enterprise)}/replay`,
                                    {event_ids: [Number(id)]});
          if (answer.ok && (answer.body.replayed || []).includes(Number(id))) {
            // The live view may already have shown the replayed delivery's new state (it can
            // be delivered before this answer arrives): never step back to "pending" then.
            if (row.dataset.status === before) {
              fill(row, {...rowItem(row), status: "pending", attempts: 0, last_error: "",
                         replayable: false});
            }
          } else {
            row.querySelector("[data-field=last_error]").textContent = own["not-replayed"];
          }
        } else if (button.dataset.action === "attempts") {
          const next = row.nextElementSibling;
          if (next && next.classList.contains("attempts")) { next.remove(); return; }
          const answer = await call("GET",
            `/journal/${encodeURIComponent(enterprise)}/deliveries/${encodeURIComponent(id)}`);
          const detail = document.createElement("tr");
          detail.className = "attempts";
          const cell = document.createElement("td");
          cell.colSpan = row.cells.length;
          const pre = document.createElement("pre");
          const attempts = (answer.body && answer.body.attempts) || [];
          pre.textContent = attempts.length ? JSON.stringify(attempts, null, 2) : own["no-attempts"];
          cell.appendChild(pre);
          detail.appendChild(cell);
          row.after(detail);
        }
      } finally {
        button.disabled = false;
      }
    });

    function rowItem(row) {
      const item = {event_id: row.dataset.eventId};
      for (const cell of row.querySelectorAll("[data-field]")) item[cell.dataset.field] = cell.textContent;
      return item;
    }

    const state = document.getElementById("live-state");
    if (!state || state.hidden || !window.EventSource) return;
    const source = new EventSource(state.dataset.live);
    source.addEventListener("delivery", (event) => {
      const item = JSON.parse(event.data);
      let row = body.querySelector(`tr[data-event-id="${CSS.escape(String(item.event_id))}"]`);
      if (!row) {
        row = blank.content.firstElementChild.cloneNode(true);
        body.prepend(row);
        const empty = document.getElementById("journal-empty");
        if (empty) empty.remove();
      }
      fill(row, item);
      row.classList.add("fresh");
    });
    source.addEventListener("reload", () => {
      source.close();
      state.textContent = common.reload;
      state.classList.add("stale");
    });
    state.classList.add("connected");
  }

  // ------------------------------------------------------------------ sign out
  function logout(form) {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      await fetch(form.action, {method: "POST", credentials: "same-origin",
                                headers: {"X-CSRF-Token": csrf}});
      window.location.reload();
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    const forms = {connection, extensions, logout};
    for (const form of document.querySelectorAll("form[data-form]")) {
      const setup = forms[form.dataset.form];
      if (setup) setup(form);
    }
    const syncButton = document.querySelector("button[data-action=sync]");
    if (syncButton) sync(syncButton);
    const table = document.getElementById("journal");
    if (table) journal(table);
  });
})();
