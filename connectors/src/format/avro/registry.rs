//! A client of a Confluent-compatible schema registry: the three calls laminar makes
//! (schema by id, latest version of a subject, register a schema under a subject), over
//! HTTP or HTTPS with optional basic auth, schemas cached by id.
//!
//! Errors are classified for the caller: [`RegistryError::is_transient`] ones (the
//! registry unreachable or answering 5xx) are retried without dropping anything; the
//! others are answers (not found, incompatible, unauthorized) that retrying won't change.
//! The password is never printed: not by `Debug`, not in an error, not in a URL.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apache_avro::Schema;
use serde_json::{Value, json};

/// Most schemas cached by id; past it the cache starts over.
const CACHED_SCHEMAS_MAX: usize = 4096;
/// Default time one registry request may take.
pub const DEFAULT_REGISTRY_TIMEOUT: Duration = Duration::from_secs(10);
const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// The `schema_registry:` section of a pipeline file.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryOptions {
    /// `http://host:port` or `https://...` (a path prefix is kept).
    pub url: String,
    /// Basic auth user (or `user:password@` in the URL).
    pub username: Option<String>,
    /// Basic auth password; a secret: only from the environment, never printed.
    pub password: Option<String>,
    pub timeout: Duration,
}

impl std::fmt::Debug for RegistryOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryOptions")
            .field("url", &without_userinfo(&self.url))
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// `url` without the `user:password@` part, for messages.
#[must_use]
pub fn without_userinfo(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            format!("{scheme}://{host}{path}")
        }
        None => url.to_owned(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("the schema registry at {url} is unreachable: {message}")]
    Unreachable { url: String, message: String },
    #[error("the schema registry at {url} answered HTTP {status}: {message}")]
    Unavailable {
        url: String,
        status: u16,
        message: String,
    },
    #[error(
        "the schema registry at {url} refused the credentials (HTTP {status}); check schema_registry.username and password"
    )]
    Unauthorized { url: String, status: u16 },
    #[error("{what} is not in the schema registry (error {code})")]
    NotFound { what: String, code: i64 },
    #[error(
        "the schema for subject `{subject}` is incompatible with its earlier versions: {message}"
    )]
    Incompatible { subject: String, message: String },
    #[error("the schema registry rejected the schema for subject `{subject}`: {message}")]
    Invalid { subject: String, message: String },
    #[error("schema id {id} is a {kind} schema, not Avro")]
    NotAvro { id: u32, kind: String },
    #[error("schema id {id}: {message}")]
    Unsupported { id: u32, message: String },
    #[error("the schema registry at {url} answered something unexpected: {message}")]
    Protocol { url: String, message: String },
}

impl RegistryError {
    /// Whether asking again later may succeed (the registry unreachable or overloaded).
    #[must_use]
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unreachable { .. } | Self::Unavailable { .. })
    }
}

/// A version of a subject.
#[derive(Debug, Clone)]
pub struct Registered {
    pub id: u32,
    pub version: i64,
    pub schema: Arc<Schema>,
}

pub struct RegistryClient {
    agent: ureq::Agent,
    /// The URL without user info or a trailing `/`.
    base: String,
    authorization: Option<String>,
    by_id: Mutex<HashMap<u32, Arc<Schema>>>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("url", &self.base)
            .finish_non_exhaustive()
    }
}

/// The `Authorization` header value of HTTP basic auth for `user:password`.
#[must_use]
pub fn basic_auth(credentials: &str) -> String {
    format!("Basic {}", base64(credentials.as_bytes()))
}

/// Standard base64 with padding (RFC 4648), for the basic auth header.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A path segment with every character but RFC 3986's unreserved ones percent-encoded.
fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

impl RegistryClient {
    pub fn new(options: &RegistryOptions) -> Result<Self, RegistryError> {
        let url = options.url.trim_end_matches('/');
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(RegistryError::Protocol {
                url: without_userinfo(url),
                message: "the URL must start with http:// or https://".into(),
            });
        }
        // `user:password@host` in the URL, unless username/password are set.
        let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
        let authority_end = rest.find('/').unwrap_or(rest.len());
        let userinfo = rest[..authority_end]
            .rsplit_once('@')
            .map(|(u, _)| u.to_owned());
        let credentials = match (&options.username, &userinfo) {
            (Some(user), _) => Some(format!(
                "{user}:{}",
                options.password.as_deref().unwrap_or_default()
            )),
            (None, Some(info)) => Some(info.clone()),
            (None, None) => None,
        };
        let base = without_userinfo(&format!("{scheme}://{rest}"));
        let tls = ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::NativeTls)
            .build();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(options.timeout))
            .http_status_as_error(false)
            .tls_config(tls)
            .build()
            .into();
        Ok(Self {
            agent,
            base,
            authorization: credentials.as_deref().map(basic_auth),
            by_id: Mutex::new(HashMap::new()),
        })
    }

    /// The registry's URL (without credentials).
    #[must_use]
    pub fn url(&self) -> &str {
        &self.base
    }

    /// Sends a request; the status and the JSON body of any answer.
    fn request(&self, path: &str, body: Option<&Value>) -> Result<(u16, Value), RegistryError> {
        let url = format!("{}{path}", self.base);
        let unreachable = |e: ureq::Error| RegistryError::Unreachable {
            url: self.base.clone(),
            message: e.to_string(),
        };
        let response = match body {
            None => {
                let mut r = self.agent.get(&url).header("Accept", CONTENT_TYPE);
                if let Some(a) = &self.authorization {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            Some(b) => {
                let mut r = self
                    .agent
                    .post(&url)
                    .header("Accept", CONTENT_TYPE)
                    .header("Content-Type", CONTENT_TYPE);
                if let Some(a) = &self.authorization {
                    r = r.header("Authorization", a);
                }
                r.send(b.to_string())
            }
        };
        let mut response = response.map_err(unreachable)?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().map_err(unreachable)?;
        let value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).map_err(|e| RegistryError::Protocol {
                url: self.base.clone(),
                message: format!("HTTP {status} with a body that is not JSON ({e})"),
            })?
        };
        match status {
            401 | 403 => Err(RegistryError::Unauthorized {
                url: self.base.clone(),
                status,
            }),
            500..=599 => Err(RegistryError::Unavailable {
                url: self.base.clone(),
                status,
                message: message_of(&value),
            }),
            _ => Ok((status, value)),
        }
    }

    /// The schema registered under `id`, from the cache or the registry.
    pub fn schema_by_id(&self, id: u32) -> Result<Arc<Schema>, RegistryError> {
        if let Some(s) = self.by_id.lock().ok().and_then(|c| c.get(&id).cloned()) {
            return Ok(s);
        }
        let (status, body) = self.request(&format!("/schemas/ids/{id}"), None)?;
        match status {
            200 => {}
            404 => {
                return Err(RegistryError::NotFound {
                    what: format!("schema id {id}"),
                    code: code_of(&body, 40403),
                });
            }
            _ => return Err(self.unexpected(status, &body)),
        }
        let schema = Arc::new(self.parse_answer(id, &body)?);
        if let Ok(mut cache) = self.by_id.lock() {
            if cache.len() >= CACHED_SCHEMAS_MAX {
                cache.clear();
            }
            cache.insert(id, schema.clone());
        }
        Ok(schema)
    }

    /// The latest version registered under `subject`.
    pub fn latest(&self, subject: &str) -> Result<Registered, RegistryError> {
        let (status, body) = self.request(
            &format!("/subjects/{}/versions/latest", segment(subject)),
            None,
        )?;
        match status {
            200 => {}
            404 => {
                return Err(RegistryError::NotFound {
                    what: format!("subject `{subject}`"),
                    code: code_of(&body, 40401),
                });
            }
            _ => return Err(self.unexpected(status, &body)),
        }
        let id = id_of(&body).ok_or_else(|| self.unexpected(status, &body))?;
        let version = body.get("version").and_then(Value::as_i64).unwrap_or(0);
        let schema = Arc::new(self.parse_answer(id, &body)?);
        if let Ok(mut cache) = self.by_id.lock() {
            cache.insert(id, schema.clone());
        }
        Ok(Registered {
            id,
            version,
            schema,
        })
    }

    /// Registers `schema` (Avro schema JSON) under `subject` and returns its id (the
    /// existing id when it is already registered).
    pub fn register(&self, subject: &str, schema: &Value) -> Result<u32, RegistryError> {
        let body = json!({ "schema": schema.to_string() });
        let (status, answer) = self.request(
            &format!("/subjects/{}/versions", segment(subject)),
            Some(&body),
        )?;
        match status {
            200 => id_of(&answer).ok_or_else(|| self.unexpected(status, &answer)),
            409 => Err(RegistryError::Incompatible {
                subject: subject.to_owned(),
                message: message_of(&answer),
            }),
            422 => Err(RegistryError::Invalid {
                subject: subject.to_owned(),
                message: message_of(&answer),
            }),
            _ => Err(self.unexpected(status, &answer)),
        }
    }

    /// The Avro schema of a `{"schema": ..., "schemaType": ...}` answer.
    fn parse_answer(&self, id: u32, body: &Value) -> Result<Schema, RegistryError> {
        if let Some(kind) = body.get("schemaType").and_then(Value::as_str)
            && !kind.eq_ignore_ascii_case("AVRO")
        {
            return Err(RegistryError::NotAvro {
                id,
                kind: kind.to_owned(),
            });
        }
        if body
            .get("references")
            .and_then(Value::as_array)
            .is_some_and(|r| !r.is_empty())
        {
            return Err(RegistryError::Unsupported {
                id,
                message: "it uses schema references, which laminar does not resolve".into(),
            });
        }
        let text = body
            .get("schema")
            .and_then(Value::as_str)
            .ok_or_else(|| self.unexpected(200, body))?;
        Schema::parse_str(text).map_err(|e| RegistryError::Unsupported {
            id,
            message: format!("the registry's schema does not parse: {e}"),
        })
    }

    fn unexpected(&self, status: u16, body: &Value) -> RegistryError {
        RegistryError::Protocol {
            url: self.base.clone(),
            message: format!("HTTP {status}: {}", message_of(body)),
        }
    }
}

/// The schema id of an answer.
fn id_of(body: &Value) -> Option<u32> {
    body.get("id")
        .and_then(Value::as_u64)
        .and_then(|id| u32::try_from(id).ok())
}

fn message_of(body: &Value) -> String {
    body.get("message")
        .and_then(Value::as_str)
        .map_or_else(|| body.to_string(), str::to_owned)
}

fn code_of(body: &Value, default: i64) -> i64 {
    body.get("error_code")
        .and_then(Value::as_i64)
        .unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected);
        }
    }

    #[test]
    fn urls_lose_their_credentials_in_messages() {
        assert_eq!(
            without_userinfo("https://u:secret@registry:8081/prefix"),
            "https://registry:8081/prefix"
        );
        assert_eq!(without_userinfo("http://h:1"), "http://h:1");
        let options = RegistryOptions {
            url: "http://u:secret@h:1".into(),
            username: None,
            password: Some("secret2".into()),
            timeout: DEFAULT_REGISTRY_TIMEOUT,
        };
        let shown = format!("{options:?}");
        assert!(!shown.contains("secret"), "{shown}");
    }

    #[test]
    fn subjects_are_percent_encoded() {
        assert_eq!(segment("orders-value"), "orders-value");
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
    }
}
