// Batch index: one row per YAML entry; names and errors are untrusted text (textContent only).
"use strict";
(function () {
  const data = SV.data;
  const ok = data.entries.filter((e) => e.status === "ok").length;
  document.getElementById("summary").textContent =
    `${data.model} · ${data.config} · ${ok} of ${data.entries.length} entries ran`;
  const body = document.querySelector("#entries tbody");
  for (const entry of data.entries) {
    const row = body.insertRow();
    row.dataset.status = entry.status;
    row.insertCell().textContent = entry.name;
    row.insertCell().textContent = entry.status;
    row.insertCell().textContent = entry.status === "ok" ? `${entry.rows} rows, mask ${entry.mask}` : entry.error;
    const links = row.insertCell();
    for (const file of entry.files || []) {
      const a = document.createElement("a");
      a.href = encodeURIComponent(entry.name) + "/" + encodeURIComponent(file);
      a.textContent = file;
      links.append(a, " ");
    }
  }
  SV.markReady();
})();
