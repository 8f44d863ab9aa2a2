// Upload on the Evaluate page: the file goes as the raw body of PUT /data/upload (stored in the runs
// dir's uploads/, as on the Data page), then its stored path fills the eval data field.
(function () {
  const input = document.getElementById("eval-upload");
  if (!input) return;
  input.addEventListener("change", async function () {
    const file = input.files[0];
    const error = document.getElementById("eval-upload-error");
    error.textContent = "";
    if (!file) return;
    const response = await fetch("/data/upload?name=" + encodeURIComponent(file.name), {
      method: "PUT", body: file,
      headers: { "Content-Type": "application/octet-stream", "X-CSRF-Token": document.querySelector("meta[name=csrf-token]").content },
    });
    const answer = await response.json();
    if (!response.ok) { error.textContent = "error: " + answer.error; return; }
    document.getElementById("eval-data").value = answer.path;
  });
})();
