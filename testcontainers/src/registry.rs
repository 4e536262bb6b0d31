//! A schema registry for tests, speaking the Confluent Schema Registry REST API for the
//! calls laminar and its tests make, written from the API documentation: no registry
//! server can be installed on these machines (Confluent's is a JVM service outside the
//! package registries we reach, Karapace is not published as a package).
//!
//! Implemented: `GET /schemas/ids/{id}`, `GET /schemas/ids/{id}/versions`, `GET /subjects`,
//! `GET /subjects/{s}/versions`, `GET /subjects/{s}/versions/{v|latest}`,
//! `POST /subjects/{s}/versions` (register, idempotent, with the subject's compatibility
//! check), `POST /subjects/{s}` (look a schema up), `POST /compatibility/subjects/{s}/versions/{v|latest}`,
//! `GET|PUT /config` and `GET|PUT /config/{s}` (NONE, BACKWARD, FORWARD, FULL and their
//! `_TRANSITIVE` forms; default BACKWARD), and HTTP basic auth. Errors are the registry's
//! JSON bodies and codes: 40401 subject not found, 40402 version not found, 40403 schema
//! not found, 409 incompatible, 42201 invalid schema, 42203 invalid compatibility level,
//! 401 unauthorized. Schemas live in memory; ids are global and start at 1, and the same
//! schema (by Avro parsing canonical form) gets the same id under every subject.
//! Compatibility is decided by apache-avro's reader/writer resolution check; a partial
//! result (an enum or union that may fail to resolve) counts as incompatible.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use apache_avro::Schema;
use apache_avro::schema_compatibility::{Compatibility, SchemaCompatibility};
use serde_json::{Value, json};

use crate::Error;

/// Bytes of request line and headers read at most.
const HEAD_BYTES_MAX: usize = 64 << 10;
/// Bytes of request body read at most.
const BODY_BYTES_MAX: usize = 16 << 20;
/// Connections served at once; more get 503.
const CONNECTIONS_MAX: usize = 64;
const LEVELS: [&str; 7] = [
    "NONE",
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
];

struct Stored {
    text: String,
    canonical: String,
    parsed: Schema,
}

#[derive(Default)]
struct State {
    /// By id - 1.
    schemas: Vec<Stored>,
    /// Per subject, the schema id of each version (version = index + 1).
    subjects: BTreeMap<String, Vec<u32>>,
    global_level: Option<String>,
    subject_levels: BTreeMap<String, String>,
}

/// A running registry on a loopback port; stopped when dropped.
pub struct SchemaRegistry {
    addr: SocketAddr,
    available: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    requests: Arc<AtomicUsize>,
}

struct Shared {
    /// While false, every request is answered 503 (an overloaded or failing registry).
    available: Arc<AtomicBool>,
    state: Mutex<State>,
    authorization: Option<String>,
    requests: Arc<AtomicUsize>,
    active: AtomicUsize,
}

impl SchemaRegistry {
    /// A registry without authentication.
    pub fn start() -> Result<Self, Error> {
        Self::start_with(None)
    }

    /// A registry that answers only requests with these basic auth credentials.
    pub fn start_with_auth(user: &str, password: &str) -> Result<Self, Error> {
        Self::start_with(Some(
            laminar_connectors::format::avro::registry::basic_auth(&format!("{user}:{password}")),
        ))
    }

    fn start_with(authorization: Option<String>) -> Result<Self, Error> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicUsize::new(0));
        let available = Arc::new(AtomicBool::new(true));
        let shared = Arc::new(Shared {
            available: available.clone(),
            state: Mutex::new(State::default()),
            authorization,
            requests: requests.clone(),
            active: AtomicUsize::new(0),
        });
        let stopping = stop.clone();
        let accept = std::thread::Builder::new()
            .name("schema-registry".into())
            .spawn(move || {
                while !stopping.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let shared = shared.clone();
                            if shared.active.fetch_add(1, Ordering::SeqCst) >= CONNECTIONS_MAX {
                                let mut stream = stream;
                                let _ = respond(&mut stream, 503, &json!({"error_code": 50301, "message": "too many connections"}));
                                shared.active.fetch_sub(1, Ordering::SeqCst);
                                continue;
                            }
                            std::thread::spawn(move || {
                                serve(stream, &shared);
                                shared.active.fetch_sub(1, Ordering::SeqCst);
                            });
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
            })?;
        Ok(Self {
            addr,
            available,
            stop,
            accept: Some(accept),
            requests,
        })
    }

    /// `http://127.0.0.1:PORT`
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// While `false`, every request gets HTTP 503 (as from an overloaded registry).
    pub fn set_available(&self, available: bool) {
        self.available.store(available, Ordering::SeqCst);
    }

    /// Requests answered so far.
    #[must_use]
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for SchemaRegistry {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        503 => "Service Unavailable",
        _ => "Bad Request",
    }
}

fn respond(stream: &mut TcpStream, status: u16, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/vnd.schemaregistry.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}

fn error(status: u16, code: i64, message: &str) -> (u16, Value) {
    (status, json!({"error_code": code, "message": message}))
}

/// Reads one request and answers it.
fn serve(stream: TcpStream, shared: &Shared) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut head = Vec::new();
    let mut content_length = 0usize;
    let mut authorization = None;
    let mut request_line = String::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        head.extend_from_slice(line.as_bytes());
        if head.len() > HEAD_BYTES_MAX {
            let _ = respond(
                &mut writer,
                413,
                &json!({"error_code": 413, "message": "request head too large"}),
            );
            return;
        }
        let trimmed = line.trim_end();
        if request_line.is_empty() {
            trimmed.clone_into(&mut request_line);
            continue;
        }
        if trimmed.is_empty() {
            break;
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.parse().unwrap_or(0);
            } else if name.eq_ignore_ascii_case("authorization") {
                authorization = Some(value.to_owned());
            }
        }
    }
    if content_length > BODY_BYTES_MAX {
        let _ = respond(
            &mut writer,
            413,
            &json!({"error_code": 413, "message": "body too large"}),
        );
        return;
    }
    let mut body = vec![0; content_length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    shared.requests.fetch_add(1, Ordering::Relaxed);
    let (status, answer) = if !shared.available.load(Ordering::SeqCst) {
        error(503, 50003, "the registry is unavailable")
    } else if shared.authorization.is_some() && shared.authorization != authorization {
        error(401, 401, "Unauthorized")
    } else {
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or("");
        let path = parts.next().unwrap_or("");
        let body: Value = if body.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => {
                    let _ = respond(
                        &mut writer,
                        400,
                        &json!({"error_code": 400, "message": format!("invalid JSON body: {e}")}),
                    );
                    return;
                }
            }
        };
        match shared.state.lock() {
            Ok(mut state) => route(&mut state, method, path, &body),
            Err(_) => error(500, 50001, "registry state poisoned"),
        }
    };
    let _ = respond(&mut writer, status, &answer);
}

/// Percent-decodes a path segment.
fn decode_segment(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = bytes.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(&String::from_utf8_lossy(hex), 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn route(state: &mut State, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let path = path.split('?').next().unwrap_or("");
    let segments: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .map(decode_segment)
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    match (method, segments.as_slice()) {
        ("GET", ["schemas", "ids", id]) => match id
            .parse::<usize>()
            .ok()
            .and_then(|i| state.schemas.get(i.wrapping_sub(1)))
        {
            Some(s) => (200, json!({"schema": s.text})),
            None => error(404, 40403, "Schema not found"),
        },
        ("GET", ["schemas", "ids", id, "versions"]) => {
            let id: u32 = id.parse().unwrap_or(0);
            let mut out = Vec::new();
            for (subject, ids) in &state.subjects {
                for (v, &i) in ids.iter().enumerate() {
                    if i == id {
                        out.push(json!({"subject": subject, "version": v + 1}));
                    }
                }
            }
            if out.is_empty() {
                error(404, 40403, "Schema not found")
            } else {
                (200, Value::Array(out))
            }
        }
        ("GET", ["subjects"]) => (200, json!(state.subjects.keys().collect::<Vec<_>>())),
        ("GET", ["subjects", subject, "versions"]) => match state.subjects.get(*subject) {
            Some(ids) => (200, json!((1..=ids.len()).collect::<Vec<_>>())),
            None => error(404, 40401, &format!("Subject '{subject}' not found.")),
        },
        ("GET", ["subjects", subject, "versions", version]) => version_of(state, subject, version),
        ("POST", ["subjects", subject, "versions"]) => register(state, subject, body),
        ("POST", ["subjects", subject]) => lookup(state, subject, body),
        ("POST", ["compatibility", "subjects", subject, "versions", version]) => {
            let Ok(candidate) = candidate(body) else {
                return error(422, 42201, "Invalid schema");
            };
            let Some(ids) = state.subjects.get(*subject) else {
                return error(404, 40401, &format!("Subject '{subject}' not found."));
            };
            let against: Vec<u32> = match *version {
                "latest" => ids.last().copied().into_iter().collect(),
                v => match v
                    .parse::<usize>()
                    .ok()
                    .and_then(|v| ids.get(v.wrapping_sub(1)))
                {
                    Some(&id) => vec![id],
                    None => return error(404, 40402, "Version not found."),
                },
            };
            let level = level_of(state, subject);
            let ok = compatible(state, &candidate, &against, &level).is_ok();
            (200, json!({"is_compatible": ok}))
        }
        ("GET", ["config"]) => (
            200,
            json!({"compatibilityLevel": state.global_level.clone().unwrap_or_else(|| "BACKWARD".into())}),
        ),
        ("PUT", ["config"]) => match level_in(body) {
            Some(level) => {
                state.global_level = Some(level.clone());
                (200, json!({"compatibility": level}))
            }
            None => error(422, 42203, "Invalid compatibility level"),
        },
        ("GET", ["config", subject]) => match state.subject_levels.get(*subject) {
            Some(level) => (200, json!({"compatibilityLevel": level})),
            None => error(
                404,
                40408,
                &format!(
                    "Subject '{subject}' does not have subject-level compatibility configured"
                ),
            ),
        },
        ("PUT", ["config", subject]) => match level_in(body) {
            Some(level) => {
                state
                    .subject_levels
                    .insert((*subject).to_owned(), level.clone());
                (200, json!({"compatibility": level}))
            }
            None => error(422, 42203, "Invalid compatibility level"),
        },
        (_, ["schemas" | "subjects" | "compatibility" | "config", ..]) => {
            error(405, 405, "Method not allowed")
        }
        _ => error(404, 404, "HTTP 404 Not Found"),
    }
}

fn level_in(body: &Value) -> Option<String> {
    let level = body.get("compatibility")?.as_str()?.to_ascii_uppercase();
    LEVELS.contains(&level.as_str()).then_some(level)
}

fn level_of(state: &State, subject: &str) -> String {
    state
        .subject_levels
        .get(subject)
        .or(state.global_level.as_ref())
        .cloned()
        .unwrap_or_else(|| "BACKWARD".into())
}

/// The schema of a register/lookup/compatibility body, parsed.
fn candidate(body: &Value) -> Result<(String, Schema), (u16, Value)> {
    if let Some(kind) = body.get("schemaType").and_then(Value::as_str)
        && !kind.eq_ignore_ascii_case("AVRO")
    {
        return Err(error(
            422,
            42201,
            &format!("Invalid schema: schemaType {kind} is not supported by this registry"),
        ));
    }
    let Some(text) = body.get("schema").and_then(Value::as_str) else {
        return Err(error(
            422,
            42201,
            "Invalid schema: the body has no `schema` string",
        ));
    };
    match Schema::parse_str(text) {
        Ok(s) => Ok((text.to_owned(), s)),
        Err(e) => Err(error(422, 42201, &format!("Invalid schema {text}: {e}"))),
    }
}

/// Whether `candidate` may join a subject whose versions are `ids`, at `level`.
fn compatible(
    state: &State,
    candidate: &(String, Schema),
    ids: &[u32],
    level: &str,
) -> Result<(), String> {
    let against: &[u32] = if level.ends_with("_TRANSITIVE") {
        ids
    } else {
        ids.last().map(std::slice::from_ref).unwrap_or_default()
    };
    let new = &candidate.1;
    for &id in against {
        let old = &state.schemas[id as usize - 1].parsed;
        let reads = |writer: &Schema, reader: &Schema| {
            matches!(
                SchemaCompatibility::can_read(writer, reader),
                Ok(Compatibility::Full)
            )
        };
        let (backward, forward) = match level.trim_end_matches("_TRANSITIVE") {
            "BACKWARD" => (true, false),
            "FORWARD" => (false, true),
            "FULL" => (true, true),
            _ => (false, false),
        };
        if backward && !reads(old, new) {
            return Err(format!(
                "the new schema cannot read data written with version id {id} ({level})"
            ));
        }
        if forward && !reads(new, old) {
            return Err(format!(
                "data written with the new schema cannot be read with version id {id} ({level})"
            ));
        }
    }
    Ok(())
}

fn register(state: &mut State, subject: &str, body: &Value) -> (u16, Value) {
    let candidate = match candidate(body) {
        Ok(c) => c,
        Err(e) => return e,
    };
    let canonical = candidate.1.canonical_form();
    let ids = state.subjects.get(subject).cloned().unwrap_or_default();
    if let Some(&id) = ids
        .iter()
        .find(|&&id| state.schemas[id as usize - 1].canonical == canonical)
    {
        return (200, json!({"id": id}));
    }
    let level = level_of(state, subject);
    if let Err(details) = compatible(state, &candidate, &ids, &level) {
        return error(
            409,
            409,
            &format!(
                "Schema being registered is incompatible with an earlier schema for subject \"{subject}\", details: {details}"
            ),
        );
    }
    let known = state.schemas.iter().position(|s| s.canonical == canonical);
    let id = if let Some(i) = known {
        i as u32 + 1
    } else {
        state.schemas.push(Stored {
            text: candidate.0,
            canonical,
            parsed: candidate.1,
        });
        state.schemas.len() as u32
    };
    state
        .subjects
        .entry(subject.to_owned())
        .or_default()
        .push(id);
    (200, json!({"id": id}))
}

fn version_of(state: &State, subject: &str, version: &str) -> (u16, Value) {
    let Some(ids) = state.subjects.get(subject) else {
        return error(404, 40401, &format!("Subject '{subject}' not found."));
    };
    let index = match version {
        "latest" | "-1" => ids.len().checked_sub(1),
        v => v
            .parse::<usize>()
            .ok()
            .and_then(|v| v.checked_sub(1))
            .filter(|&i| i < ids.len()),
    };
    match index {
        Some(i) => {
            let id = ids[i];
            (
                200,
                json!({"subject": subject, "version": i + 1, "id": id, "schema": state.schemas[id as usize - 1].text}),
            )
        }
        None => error(404, 40402, "Version not found."),
    }
}

fn lookup(state: &State, subject: &str, body: &Value) -> (u16, Value) {
    let candidate = match candidate(body) {
        Ok(c) => c,
        Err(e) => return e,
    };
    let Some(ids) = state.subjects.get(subject) else {
        return error(404, 40401, &format!("Subject '{subject}' not found."));
    };
    let canonical = candidate.1.canonical_form();
    match ids
        .iter()
        .position(|&id| state.schemas[id as usize - 1].canonical == canonical)
    {
        Some(i) => {
            let id = ids[i];
            (
                200,
                json!({"subject": subject, "version": i + 1, "id": id, "schema": state.schemas[id as usize - 1].text}),
            )
        }
        None => error(404, 40403, "Schema not found"),
    }
}

#[cfg(test)]
mod tests {
    use laminar_connectors::format::avro::{RegistryClient, RegistryError, RegistryOptions};
    use serde_json::json;

    use super::*;

    fn client(url: &str, user: Option<&str>, password: Option<&str>) -> RegistryClient {
        RegistryClient::new(&RegistryOptions {
            url: url.to_owned(),
            username: user.map(str::to_owned),
            password: password.map(str::to_owned),
            timeout: Duration::from_secs(5),
        })
        .unwrap()
    }

    fn user(fields: &Value) -> Value {
        json!({"type": "record", "name": "User", "fields": fields})
    }

    #[test]
    fn registry_registers_evolves_and_refuses_incompatible_schemas() {
        let registry = SchemaRegistry::start().unwrap();
        let c = client(&registry.url(), None, None);
        let v1 = user(&json!([{"name": "id", "type": "long"}]));
        let id1 = c.register("users-value", &v1).unwrap();
        assert_eq!(c.register("users-value", &v1).unwrap(), id1, "idempotent");
        // The same schema under another subject keeps its id.
        assert_eq!(c.register("other-value", &v1).unwrap(), id1);
        // BACKWARD: a field added with a default is compatible, one without is not.
        let v2 = user(
            &json!([{"name": "id", "type": "long"}, {"name": "n", "type": "int", "default": 0}]),
        );
        let id2 = c.register("users-value", &v2).unwrap();
        assert_ne!(id1, id2);
        let bad = user(&json!([{"name": "id", "type": "string"}]));
        let e = c.register("users-value", &bad).unwrap_err();
        assert!(matches!(e, RegistryError::Incompatible { .. }), "{e}");
        let latest = c.latest("users-value").unwrap();
        assert_eq!((latest.id, latest.version), (id2, 2));
        assert_eq!(
            c.schema_by_id(id1).unwrap().canonical_form(),
            Schema::parse_str(&v1.to_string()).unwrap().canonical_form()
        );
        assert!(matches!(
            c.schema_by_id(999),
            Err(RegistryError::NotFound { code: 40403, .. })
        ));
        assert!(matches!(
            c.latest("nope"),
            Err(RegistryError::NotFound { code: 40401, .. })
        ));
        let e = c
            .register("users-value", &json!({"type": "record"}))
            .unwrap_err();
        assert!(matches!(e, RegistryError::Invalid { .. }), "{e}");
    }

    #[test]
    fn registry_checks_basic_auth() {
        let registry = SchemaRegistry::start_with_auth("ann", "s3cret").unwrap();
        let good = client(&registry.url(), Some("ann"), Some("s3cret"));
        let v1 = user(&json!([{"name": "id", "type": "long"}]));
        good.register("u-value", &v1).unwrap();
        let bad = client(&registry.url(), Some("ann"), Some("wrong"));
        let e = bad.latest("u-value").unwrap_err();
        assert!(
            matches!(e, RegistryError::Unauthorized { status: 401, .. }),
            "{e}"
        );
        assert!(!e.to_string().contains("wrong"));
        // Credentials in the URL work too.
        let in_url = client(
            &registry.url().replace("http://", "http://ann:s3cret@"),
            None,
            None,
        );
        assert_eq!(in_url.latest("u-value").unwrap().version, 1);
    }

    #[test]
    fn registry_unreachable_is_transient() {
        let port = crate::free_port().unwrap();
        let c = client(&format!("http://127.0.0.1:{port}"), None, None);
        let e = c.schema_by_id(1).unwrap_err();
        assert!(e.is_transient(), "{e}");
    }
}
