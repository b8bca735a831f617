// Starts Swagger UI on /api/docs from the hub's own OpenAPI document (a file, not inline: the CSP forbids those).
(function () {
  "use strict";
  let csrf = null;
  // Logged in to the admin pages? Then "Try it out" works with the session; changes need its CSRF token.
  fetch("/api/v1/auth/me", {credentials: "same-origin"})
    .then(function (r) { return r.ok ? r.json() : null; })
    .then(function (me) { csrf = me && me.csrfToken; })
    .catch(function () {});
  window.addEventListener("DOMContentLoaded", function () {
    window.ui = SwaggerUIBundle({
      url: "/api/v1/openapi.json",
      dom_id: "#swagger-ui",
      deepLinking: true,
      validatorUrl: null,  // never the public validator: the page works offline
      presets: [SwaggerUIBundle.presets.apis],
      layout: "BaseLayout",
      requestInterceptor: function (request) {
        if (csrf && request.method && request.method.toUpperCase() !== "GET") {
          request.headers["X-CSRF-Token"] = csrf;
        }
        return request;
      },
    });
  });
})();
