// Not shipped by userhub: the Swagger UI page loads swagger-ui-bundle.js and
// swagger-ui-standalone-preset.js only (see .cargo/config.toml).
