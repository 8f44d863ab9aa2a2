// Inline errors on the Recipe page: each problem `recipe check` reported (listed in #check, each with
// the dotted path it names) is also shown under its input, which is marked invalid; a problem in a
// collapsed sub-section opens it. The messages are the server's, unchanged.
(function () {
  function showInline() {
    document.querySelectorAll(".field-error").forEach(function (p) {
      const input = document.getElementById(p.dataset.for);
      if (input) {
        input.removeAttribute("aria-invalid");
        const rest = (input.getAttribute("aria-describedby") || "").split(" ").filter((id) => id && id !== p.id);
        if (rest.length) input.setAttribute("aria-describedby", rest.join(" "));
        else input.removeAttribute("aria-describedby");
      }
      p.remove();
    });
    document.querySelectorAll("#problems li[data-path]").forEach(function (item) {
      const input = document.querySelector('#recipe [name="' + CSS.escape(item.dataset.path) + '"]');
      if (!input) return;
      const p = document.createElement("p");
      p.className = "error field-error";
      p.id = input.id + "-error";
      p.dataset.for = input.id;
      p.textContent = item.textContent.replace(/^bad /, "");
      input.insertAdjacentElement("afterend", p);
      input.setAttribute("aria-invalid", "true");
      const described = (input.getAttribute("aria-describedby") || "").split(" ").filter(Boolean);
      input.setAttribute("aria-describedby", described.concat([p.id]).join(" "));  // read with the field
      const details = input.closest("details");
      if (details) details.open = true;
    });
  }
  document.addEventListener("htmx:afterSettle", function (event) {
    if (event.target.id === "check" || event.target.id === "recipe-form") showInline();
  });
  document.addEventListener("DOMContentLoaded", showInline);
})();
