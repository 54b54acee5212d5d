//! HTTP image fetching for ingest (reqwest, async on one runtime thread): per-request
//! timeout, retries with exponential backoff for transient failures, a body size limit,
//! an identifiable User-Agent and `X-Robots-Tag` opt-outs. Every failure maps to a
//! `SampleStatus` and a message; nothing here aborts the ingest.

use std::time::Duration;

use reqwest::header::{HeaderMap, CONTENT_LENGTH, LOCATION};

use crate::data::records::SampleStatus;
use crate::error::{Error, Result};

/// A failed fetch: the status to record and a message naming the cause.
#[derive(Debug, Clone, PartialEq)]
pub struct FetchFailure {
    pub status: SampleStatus,
    pub message: String,
    /// Whether trying again may help (timeouts, connection errors, 429, 5xx).
    pub retryable: bool,
}

impl FetchFailure {
    fn new(status: SampleStatus, message: impl Into<String>, retryable: bool) -> Self {
        Self {
            status,
            message: message.into(),
            retryable,
        }
    }
}

/// How images are fetched: `[ingest.cc]`'s network settings.
#[derive(Debug, Clone, PartialEq)]
pub struct FetchPolicy {
    /// Per-request timeout (connect and whole answer).
    pub timeout_secs: f64,
    pub user_agent: String,
    pub max_redirects: usize,
    /// Connections kept per host.
    pub concurrency: usize,
    /// Retries of a transient failure, with exponential backoff from `retry_backoff_ms`.
    pub retries: u32,
    pub retry_backoff_ms: u64,
    pub max_image_bytes: u64,
    /// `X-Robots-Tag` values that forbid the download.
    pub disallowed_robots_tags: Vec<String>,
}

/// Fetches image bytes under a [`FetchPolicy`].
#[derive(Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    retries: u32,
    backoff: Duration,
    max_bytes: u64,
    robots_token: String,
    disallowed: Vec<String>,
}

impl Fetcher {
    pub fn new(cfg: &FetchPolicy) -> Result<Self> {
        let timeout = Duration::from_secs_f64(cfg.timeout_secs.max(0.001));
        let client = reqwest::Client::builder()
            .user_agent(cfg.user_agent.clone())
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(redirect_policy(cfg.max_redirects))
            .pool_max_idle_per_host(cfg.concurrency.max(1))
            .build()
            .map_err(|e| Error::Http(e.to_string()))?;
        let robots_token = cfg
            .user_agent
            .split(['/', ' '])
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        Ok(Self {
            client,
            retries: cfg.retries,
            backoff: Duration::from_millis(cfg.retry_backoff_ms),
            max_bytes: cfg.max_image_bytes,
            robots_token,
            disallowed: cfg
                .disallowed_robots_tags
                .iter()
                .map(|s| s.to_ascii_lowercase())
                .collect(),
        })
    }

    /// Downloads `url`, retrying transient failures with exponential backoff.
    pub async fn fetch(&self, url: &str) -> std::result::Result<Vec<u8>, FetchFailure> {
        let parsed = reqwest::Url::parse(url).map_err(|e| {
            FetchFailure::new(SampleStatus::InvalidUrl, format!("invalid URL: {e}"), false)
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(FetchFailure::new(
                SampleStatus::InvalidUrl,
                format!("unsupported scheme `{}`", parsed.scheme()),
                false,
            ));
        }
        let mut attempt = 0;
        loop {
            match self.fetch_once(parsed.clone()).await {
                Ok(bytes) => return Ok(bytes),
                Err(f) if f.retryable && attempt < self.retries => {
                    tokio::time::sleep(self.backoff * 2u32.saturating_pow(attempt)).await;
                    attempt += 1;
                }
                Err(mut f) => {
                    if attempt > 0 {
                        f.message = format!("{} (after {} retries)", f.message, attempt);
                    }
                    return Err(f);
                }
            }
        }
    }

    async fn fetch_once(&self, url: reqwest::Url) -> std::result::Result<Vec<u8>, FetchFailure> {
        let mut resp = self.client.get(url).send().await.map_err(classify)?;
        let status = resp.status();
        if status.is_redirection() {
            // A redirect that was not followed: no `Location`, or one the client could not
            // take as an http(s) URL. It is never fetched.
            let target = resp.headers().get(LOCATION).map(|l| {
                let l = String::from_utf8_lossy(l.as_bytes()).into_owned();
                resp.url().join(&l).map_or(l, |u| u.to_string())
            });
            return Err(FetchFailure::new(
                SampleStatus::RedirectError,
                match target {
                    None => format!("HTTP {status} with no Location"),
                    Some(t) => refused_redirect(&t),
                },
                false,
            ));
        }
        if !status.is_success() {
            let retryable = status.as_u16() == 429 || status.is_server_error();
            return Err(FetchFailure::new(
                SampleStatus::HttpError,
                format!("HTTP {status}"),
                retryable,
            ));
        }
        if let Some(directive) =
            robots_disallows(resp.headers(), &self.robots_token, &self.disallowed)
        {
            return Err(FetchFailure::new(
                SampleStatus::RobotsDisallowed,
                format!("X-Robots-Tag forbids use: {directive}"),
                false,
            ));
        }
        let declared = declared_length(resp.headers());
        if let Some(len) = declared.filter(|len| *len > self.max_bytes) {
            return Err(too_large(len, self.max_bytes));
        }
        let mut body =
            Vec::with_capacity(declared.unwrap_or(64 * 1024).min(self.max_bytes) as usize);
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if (body.len() + chunk.len()) as u64 > self.max_bytes {
                        return Err(too_large((body.len() + chunk.len()) as u64, self.max_bytes));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(match declared {
                        Some(len) if !e.is_timeout() && (body.len() as u64) < len => {
                            truncated(body.len(), len)
                        }
                        _ => classify(e),
                    })
                }
            }
        }
        match declared {
            Some(len) if (body.len() as u64) < len => Err(truncated(body.len(), len)),
            _ => Ok(body),
        }
    }
}

/// Why a redirect to `target` is not followed: its scheme is not http(s).
fn refused_redirect(target: &str) -> String {
    let scheme = target.split_once(':').map_or("", |(s, _)| s);
    let shown: String = target.chars().take(80).collect();
    let cut = if shown.len() < target.len() {
        "…"
    } else {
        ""
    };
    format!("redirect to a `{scheme}:` URL is not followed ({shown}{cut})")
}

/// A redirect prefcap refuses to follow.
#[derive(Debug)]
struct RefusedRedirect(String);

impl std::fmt::Display for RefusedRedirect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RefusedRedirect {}

/// Follows at most `max` redirects, and only to http(s) URLs: a redirect elsewhere (`file:`,
/// `data:`, `ftp:`) is an error before anything is requested from it.
fn redirect_policy(max: usize) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        let url = attempt.url();
        if !matches!(url.scheme(), "http" | "https") {
            let why = refused_redirect(url.as_str());
            attempt.error(RefusedRedirect(why))
        } else if attempt.previous().len() > max {
            attempt.error(RefusedRedirect(format!("more than {max} redirects")))
        } else {
            attempt.follow()
        }
    })
}

fn too_large(len: u64, max: u64) -> FetchFailure {
    FetchFailure::new(
        SampleStatus::TooLarge,
        format!("body of {len} bytes exceeds max_image_bytes={max}"),
        false,
    )
}

fn truncated(got: usize, declared: u64) -> FetchFailure {
    FetchFailure::new(
        SampleStatus::Truncated,
        format!("body ended after {got} of {declared} bytes"),
        true,
    )
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Maps a reqwest error to a sample status.
fn classify(e: reqwest::Error) -> FetchFailure {
    let msg = error_chain(&e);
    if e.is_timeout() {
        FetchFailure::new(SampleStatus::Timeout, format!("timed out: {msg}"), true)
    } else if e.is_redirect() {
        FetchFailure::new(
            SampleStatus::RedirectError,
            format!("redirects: {msg}"),
            false,
        )
    } else if e.is_builder() {
        FetchFailure::new(SampleStatus::InvalidUrl, msg, false)
    } else {
        FetchFailure::new(SampleStatus::ConnectionError, msg, true)
    }
}

/// The error and its sources, so "error sending request" says what actually went wrong.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

/// The first disallowed directive in `X-Robots-Tag` headers that applies to us: a value is
/// `[ua-token:] directive, directive...`; it applies when it names no user agent, or ours
/// (img2dataset's reading of the header).
pub fn robots_disallows(
    headers: &HeaderMap,
    our_token: &str,
    disallowed: &[String],
) -> Option<String> {
    if disallowed.is_empty() {
        return None;
    }
    for value in headers.get_all("x-robots-tag") {
        let Ok(value) = value.to_str() else { continue };
        let (ua, directives) = match value.split_once(':') {
            Some((ua, rest)) => (Some(ua.trim().to_ascii_lowercase()), rest),
            None => (None, value),
        };
        if ua.as_deref().is_some_and(|ua| ua != our_token && ua != "*") {
            continue;
        }
        for d in directives.split(',').map(|d| d.trim().to_ascii_lowercase()) {
            if disallowed.contains(&d) {
                return Some(d);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-robots-tag", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn disallowed() -> Vec<String> {
        ["noai", "noimageai", "noindex", "noimageindex"]
            .map(String::from)
            .to_vec()
    }

    #[test]
    fn robots_tag_without_user_agent_applies() {
        assert_eq!(
            robots_disallows(&headers(&["noai"]), "prefcap", &disallowed()).as_deref(),
            Some("noai")
        );
        assert_eq!(
            robots_disallows(&headers(&["nofollow, NoImageAI"]), "prefcap", &disallowed())
                .as_deref(),
            Some("noimageai")
        );
        assert_eq!(
            robots_disallows(&headers(&["nofollow"]), "prefcap", &disallowed()),
            None
        );
    }

    #[test]
    fn robots_tag_for_another_agent_is_ignored() {
        assert_eq!(
            robots_disallows(&headers(&["googlebot: noindex"]), "prefcap", &disallowed()),
            None
        );
        assert!(robots_disallows(&headers(&["prefcap: noai"]), "prefcap", &disallowed()).is_some());
        assert!(robots_disallows(
            &headers(&["otherbot: noai", "noimageindex"]),
            "prefcap",
            &disallowed()
        )
        .is_some());
    }

    #[test]
    fn empty_disallow_list_ignores_the_header() {
        assert_eq!(robots_disallows(&headers(&["noai"]), "prefcap", &[]), None);
    }
}
