//! The web page, embedded in the binary (no build step, no CDN): plain HTML, CSS and JavaScript.

/// The page.
pub(crate) const INDEX_HTML: &str = include_str!("web/index.html");
/// The page's script.
pub(crate) const APP_JS: &str = include_str!("web/app.js");
/// The page's style.
pub(crate) const APP_CSS: &str = include_str!("web/app.css");
/// The page for a request without the token (a server started with `--token`).
pub(crate) const TOKEN_HTML: &str = include_str!("web/token.html");
