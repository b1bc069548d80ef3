// The browser build of @fal-ai/client that `farm api` serves at /playground/fal-client.js:
// `npm run build:playground` writes farm/api/static/fal-client.js (window.fal = { fal, createFalClient, … }).
module.exports = require("@fal-ai/client");
