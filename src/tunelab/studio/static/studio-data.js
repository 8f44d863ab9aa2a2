// Upload on the Data page: the file goes as the raw body of PUT /data/upload (streamed to the runs
// dir's uploads/), then its stored path fills the path field and the audit runs, as if typed.
(function () {
  const input = document.getElementById("upload");
  if (!input) return;
  input.addEventListener("change", async function () {
    const file = input.files[0];
    const error = document.getElementById("upload-error");
    error.textContent = "";
    if (!file) return;
    const response = await fetch("/data/upload?name=" + encodeURIComponent(file.name), {
      method: "PUT", body: file,
      headers: { "Content-Type": "application/octet-stream", "X-CSRF-Token": document.querySelector("meta[name=csrf-token]").content },
    });
    const answer = await response.json();
    if (!response.ok) { error.textContent = "error: " + answer.error; return; }
    document.getElementById("path").value = answer.path;
    htmx.trigger("#data-form", "submit");
  });
})();
